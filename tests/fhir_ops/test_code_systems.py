"""TrialTwin's own code systems are published in full: every code the code can emit has a concept.

The codes are collected from the code itself (an AST walk for error ids, the modules' constant tables and
the operation registry for the rest), never from a second hand-kept list, so a new error id, operation or
modality without a definition in its CodeSystem fails here.
"""
from __future__ import annotations

import ast

import pytest

import profiles
from fhir_ops import auth, demo, errors
from fhir_ops.mapping import audit_event, participant, schedule
from fhir_ops.operations import registry
from fhir_ops.store import bundle
from fhir_ops.validation import validate_resource
from inference.schedule import MODALITIES
from smart_app import schedule_views
from terminology import workflow
from tests.fhir_ops.emitted_codes import ROOT, error_ids

pytestmark = pytest.mark.unit

#: file name -> the canonical url the code writes into codings
PUBLISHED = {
    "CodeSystem-error.json": errors.ERROR_SYSTEM,
    "CodeSystem-operation.json": audit_event.OPERATION_SYSTEM,
    "CodeSystem-covariate.json": participant.COVARIATE,
    "CodeSystem-version-state.json": bundle.DELETED_TAG["system"],
    "CodeSystem-visit-modality.json": schedule_views.MODALITY_CS,
    "CodeSystem-terminology-workflow.json": workflow.WORKFLOW_TAGS,
    "CodeSystem-terminology-action.json": workflow.AUDIT_ACTIONS,
    "CodeSystem-trial-role.json": demo.CS + "trial-role",
}


@pytest.fixture(scope="module")
def emitted():
    return error_ids()


def _codes(file_name: str) -> set[str]:
    return {c["code"] for c in profiles.load(file_name)["concept"]}


@pytest.mark.parametrize("file_name", sorted(PUBLISHED))
def test_each_code_system_is_complete_valid_r4(file_name):
    cs = profiles.load(file_name)
    validate_resource(cs)
    assert cs["url"] == PUBLISHED[file_name] and cs["id"] == file_name[len("CodeSystem-"):-len(".json")]
    assert (cs["status"], cs["content"], cs["caseSensitive"]) == ("active", "complete", True)
    assert cs["description"].strip() and cs["name"].isidentifier() and cs["version"]
    concepts = cs["concept"]
    assert cs["count"] == len(concepts) and len({c["code"] for c in concepts}) == len(concepts)
    for c in concepts:
        assert c["code"] == c["code"].strip() and c["display"].strip() and len(c["definition"].strip()) > 15, c
        assert not c["definition"].startswith(("…", ";", ",", "(")), c  # a sentence, not a message fragment


def test_every_error_id_the_code_can_emit_is_defined(emitted):
    found = emitted
    # an id the walk cannot reduce to literals (built at run time) would escape this check: make it static
    assert not found.unresolved, found.unresolved
    defined = _codes("CodeSystem-error.json")
    missing = {code: sites for code, sites in found.sites.items() if code not in defined}
    assert not missing, f"add these error ids to profiles/CodeSystem-error.json: {missing}"
    # and nothing is defined that no code emits any more (a renamed id leaves a stale concept)
    assert defined == set(found.sites), sorted(defined - set(found.sites))


def test_the_walk_finds_each_way_an_error_id_is_given(emitted):
    sites = emitted.sites
    # class attribute, error_id= keyword, a helper's default, a helper's positional argument, a table lookup,
    # tuple unpacking of a table, HL7 v2 conditions
    for code, where in (("version-conflict", "fhir_ops/errors.py"), ("request-budget-exceeded", "fhir_ops/limits.py"),
                        ("outside-compartment", "fhir_ops/auth.py"), ("condition-needs-study-role", "fhir_ops/auth.py"),
                        ("capacity-out-of-range", "fhir_ops/mapping/schedule.py"),
                        ("unknown-route", "fhir_ops/app.py"),
                        ("hl7v2-unknown-key-identifier", "fhir_ops/mapping/hl7v2.py"),
                        ("invalid-json", "fhir_ops/operations/registry.py"), ("malformed-json", "fhir_ops/limits.py")):
        assert any(s.startswith(where) for s in sites.get(code, [])), (code, sites.get(code))


def test_the_walk_fails_on_a_new_or_dynamic_error_id():
    source = '''
from fhir_ops.errors import InvalidRequest, FhirError

class Teapot(FhirError):
    status, code, error_id = 418, "processing", "teapot"

def _bad(name, message, error_id="bad-default"):
    return InvalidRequest(message, error_id=error_id)

TABLE = {"a": "from-table", "b": "also-from-table"}

def handler(kind, suffix):
    _bad("x", "y", "positional-id")
    _bad("x", "y", error_id="keyword-id")
    raise InvalidRequest("z", error_id=TABLE.get(kind, "table-default"))

def dynamic(suffix):
    raise InvalidRequest("z", error_id="made-" + suffix)
'''
    found = error_ids({"made_up.py": source})
    assert set(found.sites) == {"teapot", "bad-default", "positional-id", "keyword-id", "from-table",
                                "also-from-table", "table-default"}
    assert found.unresolved == ["made_up.py:18: 'made-' + suffix"]
    assert "teapot" not in _codes("CodeSystem-error.json")


def test_every_operation_the_audit_trail_can_name_is_defined():
    # AuditEvent.subtype codes an operation by its registered name ($simulate); unknown names are not coded
    shipped = {f"${r['code']}" for r in profiles.all_resources() if r["resourceType"] == "OperationDefinition"}
    registered = {op.name for op in registry.operations() if op.definition.get("url", "").startswith(
        profiles.CANONICAL_BASE)}
    assert shipped <= registered
    assert _codes("CodeSystem-operation.json") == registered


def test_covariates_modalities_tags_and_roles_the_code_writes_are_defined():
    covariates = {code for system, code, _unit in participant.MEASUREMENTS.values() if system == participant.COVARIATE}
    assert covariates and _codes("CodeSystem-covariate.json") == covariates
    assert schedule.COVARIATE_CS == participant.COVARIATE
    assert _codes("CodeSystem-version-state.json") == {bundle.DELETED_TAG["code"]}
    assert schedule.MODALITY_CS == schedule_views.MODALITY_CS == demo.CS + "visit-modality"
    assert _codes("CodeSystem-visit-modality.json") == set(MODALITIES) == set(schedule_views.MODALITY_WORDS)
    roles = set(auth.STUDY_WIDE_ROLES) | {code for _id, _f, _g, code, _d, _site in demo.STAFF}
    assert _codes("CodeSystem-trial-role.json") == roles


def _workflow_codes() -> tuple[set[str], set[str]]:
    """(meta.tag codes, AuditEvent.subtype codes) the terminology workflow writes, read from its source."""
    tree = ast.parse((ROOT / "terminology" / "workflow.py").read_text(encoding="utf-8"))
    tags, actions = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        if node.func.id == "_put":
            tags |= {k.value.value for k in node.keywords if k.arg == "_tag" and isinstance(k.value, ast.Constant)}
        elif node.func.id == "_tagged":
            tags.add(node.args[1].value)
        elif node.func.id == "audit_event":
            actions.add(node.args[1].value)
    return tags, actions


def test_the_terminology_workflow_tags_and_actions_are_defined():
    tags, actions = _workflow_codes()
    assert tags and actions  # the walk found the calls
    assert _codes("CodeSystem-terminology-workflow.json") == tags
    assert _codes("CodeSystem-terminology-action.json") == actions
