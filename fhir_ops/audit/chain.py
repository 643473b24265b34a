"""The audit trail's tamper evidence: a SHA-256 hash chain over canonical JSON records.

Pure functions: the store links each record to the previous one as it appends it, and
``$verify-audit`` walks the chain with :func:`verify` to find the first record that no longer fits.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

#: The "previous hash" of the first record.
GENESIS = "0" * 64


def canonical(content: dict) -> str:
    """The one text form of a record that is hashed: sorted keys, no spaces, UTF-8 as is.

    Examples
    --------
    >>> canonical({"b": 1, "a": [2, "é"]})
    '{"a":[2,"é"],"b":1}'
    """
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def link(prev: str, text: str) -> str:
    """The hash of a record: SHA-256 over the previous record's hash and this record's canonical text.

    Examples
    --------
    >>> h1 = link(GENESIS, canonical({"n": 1}))
    >>> link(h1, canonical({"n": 2})) != link(GENESIS, canonical({"n": 2}))
    True
    """
    return hashlib.sha256(prev.encode("ascii") + b"\n" + text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Break:
    """The first record that does not fit the chain: its sequence number and why."""

    seq: int
    reason: str


@dataclass(frozen=True)
class Verdict:
    """The result of walking a chain: how many records were checked, the last good hash, the first break."""

    checked: int
    head: str
    broken: Break | None = None


def verify(rows: Iterable[tuple[int, str, str, str]], *, start_seq: int = 1, start_prev: str = GENESIS) -> Verdict:
    """Walk records ``(seq, text, prev, hash)`` in sequence order and report the first broken link.

    A record breaks the chain when its sequence number skips (a record was deleted), its ``prev``
    differs from the hash of the record before (a record was removed or reordered), or its hash
    differs from :func:`link` of ``prev`` and its text (the record was edited).

    Examples
    --------
    >>> t1, t2 = canonical({"n": 1}), canonical({"n": 2})
    >>> h1 = link(GENESIS, t1); h2 = link(h1, t2)
    >>> verify([(1, t1, GENESIS, h1), (2, t2, h1, h2)]).broken is None
    True
    >>> verify([(1, t1, GENESIS, h1), (2, canonical({"n": 3}), h1, h2)]).broken
    Break(seq=2, reason='the record was changed after it was written: its hash does not match its content')
    """
    expected_seq, prev, checked = start_seq, start_prev, 0
    for seq, text, stored_prev, stored_hash in rows:
        if seq != expected_seq:
            return Verdict(checked, prev, Break(expected_seq, f"record {expected_seq} is missing (next found: {seq})"))
        if stored_prev != prev:
            return Verdict(checked, prev, Break(seq, "the record does not follow the one before it: its previous-hash "
                                                     "does not match"))
        if link(prev, text) != stored_hash:
            return Verdict(checked, prev, Break(seq, "the record was changed after it was written: its hash does not "
                                                     "match its content"))
        prev, expected_seq, checked = stored_hash, expected_seq + 1, checked + 1
    return Verdict(checked, prev, None)
