"""The hash chain over audit records: every kind of tampering is found at the record where it happened."""
from __future__ import annotations

import pytest

from fhir_ops.audit.chain import GENESIS, canonical, link, verify

pytestmark = pytest.mark.unit


def _chain(n: int) -> list[tuple[int, str, str, str]]:
    rows, prev = [], GENESIS
    for i in range(1, n + 1):
        text = canonical({"n": i, "outcome": "0", "who": f"client-{i % 3}"})
        digest = link(prev, text)
        rows.append((i, text, prev, digest))
        prev = digest
    return rows


def test_an_intact_chain_verifies_and_reports_its_head():
    rows = _chain(20)
    verdict = verify(rows)
    assert verdict.broken is None and verdict.checked == 20 and verdict.head == rows[-1][3]


def test_an_edited_record_is_the_first_broken_link():
    rows = _chain(20)
    seq, text, prev, digest = rows[11]
    rows[11] = (seq, text.replace('"outcome":"0"', '"outcome":"4"'), prev, digest)
    verdict = verify(rows)
    assert verdict.broken.seq == 12 and "changed" in verdict.broken.reason and verdict.checked == 11


def test_an_edited_record_with_a_recomputed_hash_breaks_the_next_link():
    rows = _chain(20)
    seq, text, prev, _ = rows[4]
    forged = text.replace('"outcome":"0"', '"outcome":"4"')
    rows[4] = (seq, forged, prev, link(prev, forged))
    assert verify(rows).broken.seq == 6


def test_a_deleted_and_a_reordered_record_are_found():
    rows = _chain(10)
    assert verify(rows[:3] + rows[4:]).broken.seq == 4
    swapped = rows[:3] + [rows[4], rows[3]] + rows[5:]
    assert verify(swapped).broken.seq == 4


def test_canonical_text_does_not_depend_on_key_order():
    assert canonical({"a": 1, "b": [1, {"y": 2, "x": 1}]}) == canonical({"b": [1, {"x": 1, "y": 2}], "a": 1})
