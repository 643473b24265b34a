"""A study's outreach policy (ResearchStudy extension ``outreach-policy``) ↔ :class:`inference.outreach.OutreachTarget`.

One extension per outcome: which outcome, the kind of target (precision or weekly capacity) and its value.
"""
from __future__ import annotations

from fhir_ops.errors import Unprocessable
from inference.outreach import TARGETS, OutreachTarget

__all__ = ["POLICY_URL", "outreach_target", "policy_extension"]

POLICY_URL = "https://trialtwin.org/fhir/StructureDefinition/outreach-policy"


def _parts(ext: dict) -> dict:
    return {p.get("url"): next((v for k, v in p.items() if k.startswith("value")), None)
            for p in ext.get("extension", [])}


def outreach_target(study: dict, outcome: str) -> OutreachTarget | None:
    """The study's target for ``outcome``, or ``None`` when it states none; 422 when the extension is malformed."""
    found = [e for e in study.get("extension", []) if e.get("url") == POLICY_URL and _parts(e).get("outcome") == outcome]
    if not found:
        return None
    where = f"ResearchStudy/{study.get('id')}.extension('{POLICY_URL}')"
    if len(found) > 1:
        raise Unprocessable(f"{where}: {len(found)} outreach policies for outcome {outcome!r}; state one",
                            error_id="invalid-outreach-policy", expression=[where])
    parts = _parts(found[0])
    kind, value = parts.get("target"), parts.get("value")
    if kind not in TARGETS or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise Unprocessable(f"{where}: needs target (one of {', '.join(TARGETS)}) and a numeric value; got "
                            f"target={kind!r}, value={value!r}", error_id="invalid-outreach-policy",
                            expression=[where])
    try:
        return OutreachTarget(kind, float(value))
    except ValueError as exc:
        raise Unprocessable(f"{where}: {exc}", error_id="invalid-outreach-policy", expression=[where]) from None


def policy_extension(outcome: str, target: OutreachTarget) -> dict:
    """The extension stating ``target`` for ``outcome`` (what a study definition carries)."""
    return {"url": POLICY_URL, "extension": [{"url": "outcome", "valueCode": outcome},
                                             {"url": "target", "valueCode": target.kind},
                                             {"url": "value", "valueDecimal": target.value}]}
