"""Responder strata <-> FHIR: the cohort to stratify, and each stratum as a ``Group`` (profile ``stratum``).

A stratum Group lists its members (``member.entity``), states its readable rule and how well the rule
picks the members, the stability of the stratification, each feature's mean, and the simulated
response under each arm (``characteristic`` entries coded in the TrialTwin code system; the arm of a
response is the ``study-arm`` extension). Every stratum of one stratification shares the
``identifier`` value ``key`` (system :data:`STRATIFICATION_SID`), which is how re-runs find them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from fhir_ops.errors import InvalidRequest, NotFound, Unprocessable
from fhir_ops.mapping.participant import versioned
from terminology.catalog import CANONICAL, TRIALTWIN_CS, UCUM

STRATUM_PROFILE = f"{CANONICAL}/StructureDefinition/stratum"
EXT_STRATUM_ARM = f"{CANONICAL}/StructureDefinition/study-arm"
STRATIFICATION_SID = f"{CANONICAL}/sid/stratification"


@dataclass(frozen=True)
class Member:
    patient_id: str
    arm: str | None
    inputs: tuple[str, ...]


def cohort_members(store, resource_type: str, resource_id: str) -> tuple[list[Member], dict]:
    """The participants of ``ResearchStudy/{id}`` (its ResearchSubjects) or ``Group/{id}`` (active
    Patient members; their arm from their ResearchSubject, when they have one) and the container."""
    ref = f"{resource_type}/{resource_id}"
    try:
        container = store.read(resource_type, resource_id)
    except NotFound:
        raise NotFound(f"{ref} does not exist", error_id="not-found") from None
    members: list[Member] = []
    if resource_type == "ResearchStudy":
        for s in store.search_all("ResearchSubject", [("study", ref)]):
            who = (s.get("individual") or {}).get("reference", "")
            if who.startswith("Patient/"):
                members.append(Member(who.partition("/")[2], s.get("actualArm") or s.get("assignedArm"),
                                      (versioned(s),)))
    else:
        for m in container.get("member", []):
            who = (m.get("entity") or {}).get("reference", "")
            if not who.startswith("Patient/") or m.get("inactive", False):
                continue
            subjects = store.search_all("ResearchSubject", [("individual", who)])
            arm = next((s.get("actualArm") or s.get("assignedArm") for s in subjects), None)
            members.append(Member(who.partition("/")[2], arm, tuple(versioned(s) for s in subjects[:1])))
    if not members:
        raise Unprocessable(f"{ref} has no participants (Patient members or ResearchSubjects)",
                            error_id="no-participants")
    return members, container


def stratification_key(source: str, settings: dict) -> str:
    """The identifier value shared by the strata of one source and one set of settings."""
    blob = json.dumps([source, settings], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_id(key: str, inputs: list[str]) -> str:
    """Provenance id of one run: the same inputs and settings give the same id (re-runs write nothing)."""
    blob = json.dumps([key, sorted(set(inputs))], separators=(",", ":"))
    return "strat-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def _quantity(value: float, unit: str = "1", code: str | None = None) -> dict:
    return {"value": round(float(value), 6), "unit": unit, "system": UCUM, "code": code or unit}


def _char(code: str, display: str, value: dict, text: str | None = None, arm: str | None = None) -> dict:
    out: dict = {}
    if arm is not None:
        out["extension"] = [{"url": EXT_STRATUM_ARM, "valueString": arm}]
    concept = {"coding": [{"system": TRIALTWIN_CS, "code": code, "display": display}]}
    if text:
        concept["text"] = text
    out["code"] = concept
    out.update(value)
    out["exclude"] = False
    return out


def build_stratum(*, key: str, index: int, k: int, source: str, member_ids: list[str], rule: str,
                  precision: float, recall: float, stability: float, means: dict[str, float],
                  responses: list[dict], response_unit: str) -> dict:
    """The Group of stratum ``index`` (0-based) of ``k``; ``responses`` rows carry arm, dose, median."""
    chars = [
        _char("stratified-from", "Stratified population", {"valueReference": {"reference": source}}),
        _char("stratum-rule", "Stratum rule", {"valueCodeableConcept": {"text": rule}}),
        _char("stratum-rule-precision", "Share of those the rule selects who are members",
              {"valueQuantity": _quantity(precision)}),
        _char("stratum-rule-recall", "Share of members the rule selects", {"valueQuantity": _quantity(recall)}),
        _char("stratification-stability", "Bootstrap adjusted Rand index of the stratification",
              {"valueQuantity": _quantity(stability)}),
    ]
    for name, value in means.items():
        chars.append(_char("stratum-feature-mean", "Mean of a stratification feature",
                           {"valueQuantity": _quantity(value)}, text=name))
    for r in responses:
        chars.append(_char("stratum-response", "Simulated response (median over members)",
                           {"valueQuantity": _quantity(r["median"], response_unit)},
                           text=f"Simulated response under {r['arm']} ({r['doseMg']:g} mg once daily)", arm=r["arm"]))
    return {
        "resourceType": "Group", "id": f"stratum-{key}-{index + 1}", "meta": {"profile": [STRATUM_PROFILE]},
        "identifier": [{"system": STRATIFICATION_SID, "value": key}],
        "active": True, "type": "person", "actual": True,
        "code": {"coding": [{"system": TRIALTWIN_CS, "code": "responder-stratum", "display": "Responder stratum"}]},
        "name": f"Stratum {index + 1} of {k} of {source}: {rule}",
        "quantity": len(member_ids),
        "characteristic": chars,
        "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in member_ids],
    }


def same_content(a: dict | None, b: dict) -> bool:
    """Whether a stored resource already says what ``b`` says (``meta`` aside)."""
    if a is None:
        return False
    strip = lambda r: {k: v for k, v in r.items() if k != "meta"}  # noqa: E731
    return strip(a) == strip(b)


def bad_parameter(name: str, message: str, error_id: str) -> InvalidRequest:
    return InvalidRequest(message, error_id=error_id, expression=[f"Parameters.parameter:{name}"])
