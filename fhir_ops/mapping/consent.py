"""Participants' Consent resources: research participation, secondary use of data, sharing with the sponsor.

Builds the Consents the demo study records and answers which participants withdrew a kind of consent,
for the paths that must leave them out (``$fit-population``, secondary-use exports).
"""
from __future__ import annotations

from dataclasses import dataclass
from terminology.catalog import TRIALTWIN_CS

SCOPE_CS = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"

RESEARCH_PARTICIPATION = "research-participation"
SECONDARY_USE = "secondary-use"
SPONSOR_SHARING = "sponsor-sharing"
#: kind -> (display, v3 ActReason purpose of use)
KINDS = {
    RESEARCH_PARTICIPATION: ("Participation in the clinical trial", "CLINTRCH"),
    SECONDARY_USE: ("Secondary use of the participant's data for research beyond the trial", "HRESCH"),
    SPONSOR_SHARING: ("Sharing of the participant's coded data with the trial sponsor", "CLINTRCH"),
}
#: Consent.status values that mean the participant does not (or no longer) consent
_NOT_GIVEN = frozenset({"inactive", "rejected", "entered-in-error"})


def consent_resource(consent_id: str, patient_id: str, kind: str, when: str, *, withdrawn_on: str | None = None,
                     meta: dict | None = None) -> dict:
    """A Consent of one kind for one participant; withdrawn ones are ``inactive`` with a ``deny`` provision.

    Examples
    --------
    >>> c = consent_resource("c1", "p1", SECONDARY_USE, "2026-01-05", withdrawn_on="2026-05-01")
    >>> c["status"], c["provision"]["type"], c["dateTime"]
    ('inactive', 'deny', '2026-05-01')
    """
    if kind not in KINDS:
        raise ValueError(f"unknown consent kind {kind!r}; known: {', '.join(KINDS)}")
    display, purpose = KINDS[kind]
    consent = {
        "resourceType": "Consent", "id": consent_id,
        "status": "inactive" if withdrawn_on else "active",
        "scope": {"coding": [{"system": SCOPE_CS, "code": "research", "display": "Research"}]},
        "category": [{"coding": [{"system": TRIALTWIN_CS, "code": kind, "display": display}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": withdrawn_on or when,
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTIN", "display": "opt-in"}]},
        "provision": {"type": "deny" if withdrawn_on else "permit",
                      "period": {"start": when, **({"end": withdrawn_on} if withdrawn_on else {})},
                      "purpose": [{"system": ACT_REASON, "code": purpose}]},
    }
    if meta is not None:
        consent["meta"] = meta
    return consent


def consent_kind(consent: dict) -> str | None:
    """The TrialTwin kind of a Consent (its category code in the TrialTwin code system), if any."""
    for cc in consent.get("category") or []:
        for coding in (cc or {}).get("coding") or []:
            if coding.get("system") == TRIALTWIN_CS and coding.get("code") in KINDS:
                return coding["code"]
    return None


def is_withdrawn(consent: dict) -> bool:
    """Whether a Consent records that the participant does not consent (status or a ``deny`` provision)."""
    return consent.get("status") in _NOT_GIVEN or (consent.get("provision") or {}).get("type") == "deny"


@dataclass(frozen=True)
class Withdrawal:
    """A participant left out of a use of their data, and the Consent version that says why."""

    patient_id: str
    consent_ref: str  # versioned: Consent/x/_history/n
    kind: str

    def reason(self) -> str:
        return f"Patient/{self.patient_id} left out: {self.kind} consent withdrawn ({self.consent_ref})"


def withdrawals(store, kind: str = SECONDARY_USE) -> dict[str, Withdrawal]:
    """Patient id -> Withdrawal for every participant whose newest Consent of ``kind`` is withdrawn.

    A participant without any Consent of that kind is not listed: consent to the trial's own uses was
    given at enrolment, and only a recorded withdrawal takes a participant out (docs/export.md).
    """
    newest: dict[str, dict] = {}
    for consent in store.search_all("Consent", [("category", f"{TRIALTWIN_CS}|{kind}")]):
        if consent_kind(consent) != kind:
            continue
        ref = ((consent.get("patient") or {}).get("reference") or "")
        if not ref.startswith("Patient/"):
            continue
        pid = ref.split("/")[1]
        known = newest.get(pid)
        if known is None or (consent.get("dateTime") or "") > (known.get("dateTime") or ""):
            newest[pid] = consent
    out = {}
    for pid, consent in newest.items():
        if is_withdrawn(consent):
            version = (consent.get("meta") or {}).get("versionId")
            ref = f"Consent/{consent['id']}" + (f"/_history/{version}" if version else "")
            out[pid] = Withdrawal(pid, ref, kind)
    return out
