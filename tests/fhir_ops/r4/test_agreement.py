"""Validation agreement: the compiled R4 validator against the former fhir.resources R4B path.

Reference verdict: the R4B pydantic model (fhir_ops.r4.r4b_reference, full model, no shape cache) and,
for codes with a required binding, the R4B model's own enumerated codes where that list is complete and
equal to R4's. Exclusions (R4B's models do not implement these R4 rules, so R4B accepts what R4 refuses):
required bindings whose R4B code list is open ('+') or differs, empty JSON objects / arrays / strings
(json.html: never empty), JSON kind coercion ("true" for a boolean, "12" for a dateTime), whitespace in
uri-family values (regex \\S*), tabs or line breaks inside a code (the published regex allows them, the
datatypes.html prose and HAPI do not), and invariants ext-1 / dom-2. Every excluded disagreement must be one of
these and must be a rejection by R4 (R4 never accepts what R4B refuses). HAPI's $validate is the
reference of the integration tier (tests/integration/test_r4_validation.py).
"""
from __future__ import annotations

import collections

import pytest

from fhir_ops.errors import InvalidRequest
from fhir_ops.r4 import r4b_reference as r4b
from fhir_ops.r4.validator import is_valid, validate
from tests.fhir_ops.r4.corpus import bound_codes, cases, demo_bases, hand_written_bases

pytestmark = pytest.mark.unit


def _r4b_enum(resource_type: str, path: tuple):
    """The R4B model's enumerated codes of the element at ``path`` (None where it declares none)."""
    model = r4b.resource_model(resource_type)
    for step in path:
        if isinstance(step, int):
            continue
        field = r4b._fields_by_json_name(model).get(step)
        if field is None:
            return None
        klass = getattr(r4b._unwrap(field.annotation), "get_model_klass", None)
        if klass is None:
            return (field.json_schema_extra or {}).get("enum_values")
        model = klass()
    return None


def _r4b_accepts(resource: dict) -> bool:
    try:
        r4b.validate_resource_full(resource)
        return True
    except InvalidRequest:
        return False


def _excluded(issue) -> str | None:
    """Which documented R4B gap explains an R4 rejection that R4B accepts (None: not excluded)."""
    message = issue.message
    if issue.code == "code-invalid":
        return "binding-open-in-r4b"
    if issue.code == "invariant":
        return "invariant"
    if message.startswith(("must not be empty", "must not be an empty", "unknown resource type None")):
        return "json-empty"
    if message.startswith("must be a JSON"):
        return "json-kind"
    if message.endswith(("not a valid uri", "not a valid url", "not a valid canonical")):
        return "uri-whitespace"
    if message.endswith("is not a valid base64Binary"):
        return "base64-lenient"  # R4B decodes '2024-13-01' to bytes (it drops characters outside the alphabet)
    if message.endswith("is not a valid code") and any(c in message for c in ("\\t", "\\n", "\\r", "  ")):
        return "code-whitespace"
    return None


def _corpus() -> list[tuple[str, dict]]:
    out = []
    for base in hand_written_bases() + demo_bases():
        out.extend(cases(base))
    return out


def test_every_base_is_valid_r4():
    for base in hand_written_bases() + demo_bases():
        assert validate(base) == [], base["resourceType"]


def test_fast_pass_and_reporting_pass_agree():
    """is_valid (no expressions) and validate (full report) give the same verdict on every case."""
    for rule, resource in _corpus():
        assert is_valid(resource) == (validate(resource) == []), rule


def test_verdicts_agree_with_the_r4b_reference():
    strict_agreements = 0
    excluded = collections.Counter()
    rejected_by_both = accepted_by_both = 0
    complete_enums: dict = {}
    for rule, resource in _corpus():
        issues = validate(resource)
        ours = not issues
        theirs = _r4b_accepts(resource)
        if rule.startswith("binding"):
            for path, _url, codes in bound_codes(resource):
                enum = _r4b_enum(resource["resourceType"], path)
                complete = enum is not None and "+" not in enum and set(enum) == set(codes)
                complete_enums[complete] = complete_enums.get(complete, 0) + 1
                value = resource
                for step in path:
                    value = value[step]
                if complete and value not in enum:
                    theirs = False
        if ours == theirs:
            strict_agreements += 1
            rejected_by_both += not ours
            accepted_by_both += ours
            continue
        assert not ours, f"R4 accepts what R4B refuses ({rule}): {resource}"
        reasons = {_excluded(i) for i in issues}
        assert None not in reasons, f"unexplained disagreement ({rule}): {[tuple(i) for i in issues]}"
        excluded.update(reasons)
    # >= 1,000 resources, valid and invalid, with the same verdict; the exclusions are the documented ones
    assert strict_agreements >= 1000 and rejected_by_both >= 500 and accepted_by_both >= 300, \
        (strict_agreements, rejected_by_both, accepted_by_both)
    assert complete_enums.get(True, 0) > complete_enums.get(False, 0)
    assert set(excluded) <= {"binding-open-in-r4b", "invariant", "json-empty", "json-kind", "uri-whitespace",
                             "code-whitespace", "base64-lenient"}


def test_corpus_covers_every_rule():
    rules = collections.Counter(rule for rule, _ in _corpus())
    for rule in ("valid", "unknown-element", "missing-element", "cardinality-wrapped", "cardinality-unwrapped",
                 "empty-array", "empty-object", "primitive-format", "primitive-kind", "choice-twice",
                 "binding-invalid", "binding-valid"):
        assert rules[rule] > 0, rule
    assert sum(rules.values()) >= 1000
