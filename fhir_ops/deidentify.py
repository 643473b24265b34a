"""HIPAA Safe Harbor de-identification of FHIR R4 resources (45 CFR 164.514(b)(2)), with keyed pseudonyms.

One walk over each resource's JSON removes or generalizes the 18 identifier kinds, wherever they sit
(extensions and contained resources included), and counts what it changed for the report.

Free text (narrative, notes, descriptions, strings in extensions) is dropped, not scanned: a PHI
detector such as Presidio finds most names and numbers but not all, and Safe Harbor allows none, so
removing the text is the only rule that cannot miss (docs/export.md).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

PSEUDONYM_SYSTEM = "https://trialtwin.org/fhir/sid/pseudonym"
AGE_EXTENSION = "https://trialtwin.org/fhir/StructureDefinition/age-90-or-older"
DEID_TAG = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED",
            "display": "pseudonymized"}
DATE_MODES = ("year", "shift")
REMOVED_DISPLAY = "(removed by de-identification)"
#: The three-digit ZIP prefixes whose areas held 20,000 people or fewer (2000 Census), which Safe
#: Harbor requires to be reported as 000 (HHS, Guidance Regarding Methods for De-identification, 2012).
RESTRICTED_ZIP3 = frozenset({"036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831",
                             "878", "879", "884", "890", "893"})
#: Date shift range in days (never 0): large enough to hide the true dates, small enough to keep seasons
SHIFT_DAYS = 182

_DATE = re.compile(r"^(\d{4})(-(\d{2})(-(\d{2})(T(\d{2}):(\d{2})(:(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")
#: elements whose string values are free text and may hold any identifier
_FREE_TEXT = frozenset({"note", "comment", "description", "patientInstruction", "valueString", "valueMarkdown",
                        "display", "alias", "title", "summary", "conclusion", "purpose", "outcomeDesc"})
#: elements that identify a person or their devices and are removed outright
_REMOVED = {
    "telecom": "telecom-removed",  # phone, fax, email, URL (identifiers 4, 5, 6, 14)
    "photo": "photos-removed",  # full-face photographs (17)
    "serialNumber": "device-identifiers-removed",  # device and vehicle serial numbers (12, 13)
    "udiCarrier": "device-identifiers-removed",
    "distinctIdentifier": "device-identifiers-removed",
    "lotNumber": "device-identifiers-removed",
    "subscriberId": "identifiers-removed",  # health plan numbers held as strings (9)
    "position": "geolocations-removed",  # Location.position: coordinates (2)
    "network": "network-addresses-removed",  # AuditEvent.agent.network: IP addresses (15)
    "contact": "contacts-removed",  # Patient.contact: relatives' names, addresses, phones
    "communication": None,  # kept: a language is not an identifier
}
_REMOVED = {k: v for k, v in _REMOVED.items() if v}
#: extension value types that can hold free text, names, contact points, URLs or binary data
_EXTENSION_DROPPED = frozenset({"valueString", "valueMarkdown", "valueHumanName", "valueContactPoint", "valueUri",
                                "valueUrl", "valueAttachment", "valueBase64Binary", "valueAnnotation",
                                "valueNarrative", "valueId", "valueOid", "valueUuid", "valueCanonical"})
#: keys whose string values are never dates (codes, systems, ids, references)
_NOT_DATES = frozenset({"id", "reference", "system", "code", "url", "version", "versionId", "div", "value",
                        "unit", "profile", "status", "language"})


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (dict, list)) and not value)


def _mentions_patient(node: Any) -> bool:
    """Whether any reference in ``node`` points at a Patient (a Device assigned to one, say): then it is about
    that person even when it lies outside the R4 Patient compartment."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ("Patient/" in ref):
            return True
        return any(_mentions_patient(v) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
        return any(_mentions_patient(v) for v in node)
    return False


class DeidentifyError(ValueError):
    """The key or a parameter of the de-identification is unusable."""


@dataclass
class SafeHarbor:
    """De-identify resources with one key: the same key always gives the same pseudonyms and shifts.

    Parameters
    ----------
    key : bytes
        The secret HMAC key (at least 16 bytes). Whoever holds it can re-link a pseudonym to the
        original id by recomputing it; without it the pseudonyms say nothing.
    date_mode : {"year", "shift"}
        ``year``: every date of a participant keeps its year only (Safe Harbor). ``shift``: every
        date of a participant moves by the same keyed number of days (1..182, either way), so
        intervals are kept; the birth date is then also reduced to its year.
    today : datetime.date
        The date ages are computed at (ages over 89 are aggregated into "90 or older").

    Examples
    --------
    >>> sh = SafeHarbor(b"k" * 32, "year", date(2026, 12, 1))
    >>> out = sh.apply({"resourceType": "Patient", "id": "p1", "birthDate": "1961-04-12",
    ...                 "name": [{"family": "Doe"}], "address": [{"city": "Boston", "state": "MA",
    ...                 "postalCode": "02134"}]})
    >>> out["birthDate"], out["address"], "name" in out, out["id"] == sh.pseudonym("Patient", "p1")
    ('1961', [{'state': 'MA', 'postalCode': '021'}], False, True)
    """

    key: bytes
    date_mode: str = "year"
    today: date = field(default_factory=date.today)
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise DeidentifyError("a de-identification key needs at least 16 bytes")
        if self.date_mode not in DATE_MODES:
            raise DeidentifyError(f"date mode must be one of {', '.join(DATE_MODES)}, got {self.date_mode!r}")

    # --- keyed values ------------------------------------------------------------------------------
    def _mac(self, text: str) -> bytes:
        return hmac.new(self.key, text.encode("utf-8"), hashlib.sha256).digest()

    def pseudonym(self, resource_type: str, resource_id: str) -> str:
        """The pseudonymous id of ``resource_type/resource_id`` (26 characters of base32 HMAC-SHA256)."""
        cache = self.__dict__.setdefault("_pseudonyms", {})  # every resource names its participant again
        key = (resource_type, resource_id)
        found = cache.get(key)
        if found is None:
            found = cache[key] = base64.b32encode(
                self._mac(f"id|{resource_type}/{resource_id}")).decode("ascii")[:26].lower()
        return found

    def shift_days(self, patient_id: str) -> int:
        """The participant's date shift in days: keyed, never 0, within +-SHIFT_DAYS."""
        n = int.from_bytes(self._mac(f"shift|{patient_id}")[:4], "big") % (2 * SHIFT_DAYS)
        return n - SHIFT_DAYS if n < SHIFT_DAYS else n - SHIFT_DAYS + 1

    # --- the walk ----------------------------------------------------------------------------------
    def apply(self, resource: dict, participants: set[str] | frozenset = frozenset()) -> dict:
        """A de-identified copy of ``resource``.

        ``participants`` are the ids of the Patients whose compartment holds it; with exactly one, its
        dates are shifted by that participant's shift (``shift`` mode); with several (a Group) they
        keep their year only in both modes. A resource about no person (the study, a site, a model)
        keeps its content: only its id and references are pseudonymized and its narrative dropped.
        """
        shift = None
        if self.date_mode == "shift" and len(participants) == 1:
            shift = self.shift_days(next(iter(participants)))
        personal = bool(participants) or resource.get("resourceType") in ("Patient", "RelatedPerson", "Person",
                                                                          "Practitioner") or _mentions_patient(resource)
        out = self._node(resource, resource.get("resourceType"), shift, personal, top=True)
        meta = out.setdefault("meta", {})
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)  # the receiving server sets its own
        meta.pop("source", None)
        meta["security"] = [*(meta.get("security") or []), dict(DEID_TAG)]
        if resource.get("resourceType") == "Patient":
            self._age(resource, out)
        return out

    def _age(self, original: dict, out: dict) -> None:
        birth = original.get("birthDate")
        m = _DATE.match(birth or "")
        if not m:
            return
        year = int(m.group(1))
        month, day = int(m.group(3) or 1), int(m.group(5) or 1)
        age = self.today.year - year - ((self.today.month, self.today.day) < (month, day))
        if age > 89:
            # Safe Harbor: ages over 89, and every date element that reveals such an age, become "90 or older"
            out.pop("birthDate", None)
            out.pop("_birthDate", None)  # its extensions (a birth time) would tell the year again
            out.setdefault("extension", []).append({"url": AGE_EXTENSION, "valueBoolean": True})
            self.counts["ages-over-89-aggregated"] += 1
        else:
            out["birthDate"] = m.group(1)  # the year only, also when the other dates are shifted

    def _node(self, node: Any, rtype: str | None, shift: int | None, personal: bool, top: bool = False,
              parent_key: str = "") -> Any:
        if isinstance(node, list):
            items = [self._node(x, rtype, shift, personal, parent_key=parent_key) for x in node]
            return [x for x in items if not _empty(x)]
        if not isinstance(node, dict):
            return node
        out: dict = {}
        is_codeable = "coding" in node
        for key, value in node.items():
            if isinstance(value, (bool, int, float)):
                out[key] = value  # numbers and flags identify nobody
            elif key == "resourceType":
                out[key] = value
            elif key == "id" and top:
                out[key] = self.pseudonym(rtype, value)
                self.counts["ids-pseudonymized"] += 1
            elif key == "text" and isinstance(value, dict) and "div" in value:
                self.counts["narratives-removed"] += 1  # Narrative: free text (18), in every resource
            elif key == "contained" and isinstance(value, list):
                out[key] = [self._node(r, r.get("resourceType"), shift, personal, top=False)
                            for r in value if isinstance(r, dict)]
            elif key == "reference" and isinstance(value, str):
                out[key] = self._reference(value)
            elif not personal:
                # a site, the study, a model: nothing in it is about a person; only ids and references
                # change, so that they still point at the pseudonymized participants' resources
                out[key] = self._node(value, rtype, shift, personal, parent_key=key)
            elif key == "text" and not is_codeable:
                self.counts["free-text-removed"] += 1  # Annotation.text, Dosage.text, a CodeableConcept without codes
            elif key in _REMOVED and not (key == "contact" and rtype not in ("Patient", "Person", "RelatedPerson")):
                self.counts[_REMOVED[key]] += 1
            elif key in _FREE_TEXT and not (key == "display" and parent_key == "coding"):
                self.counts["free-text-removed"] += 1
            elif key == "name" and not isinstance(value, str):
                self.counts["names-removed"] += 1  # HumanName (1)
            elif key == "address":
                out[key] = self._addresses(value)
            elif key in ("extension", "modifierExtension"):
                kept = [e for e in (self._extension(x, rtype, shift, personal) for x in value if isinstance(x, dict))
                        if e is not None]
                if kept:
                    out[key] = kept
            elif key in ("identifier", "valueIdentifier"):
                ident = self._identifiers(value)
                if ident:
                    out[key] = ident
            elif key in ("data", "url") and "contentType" in node:
                self.counts["attachments-removed"] += 1  # biometrics, photos, documents (16, 17)
            elif isinstance(value, str) and key not in _NOT_DATES and "-" in value and _DATE.match(value):
                out[key] = self._date(value, shift)
            else:
                out[key] = self._node(value, rtype, shift, personal, parent_key=key)
        if personal and is_codeable and isinstance(node.get("text"), str):
            out["text"] = node["text"]  # a CodeableConcept's label, from terminology
        # an element left empty by a removal goes too: R4 allows no empty objects or arrays
        out = {k: v for k, v in out.items() if not _empty(v)}
        if not out and isinstance(node.get("display"), str):
            out = {"display": REMOVED_DISPLAY}  # a Reference that was only a name: kept, if required, as a marker
        return out

    def _extension(self, ext: dict, rtype, shift, personal) -> dict | None:
        dropped = [k for k in ext if k in _EXTENSION_DROPPED]
        if dropped:
            self.counts["extensions-removed"] += 1
            return None
        if "valueAddress" in ext:
            return {**ext, "valueAddress": self._addresses([ext["valueAddress"]])[0]}
        return self._node(ext, rtype, shift, personal, parent_key="extension")

    def _identifiers(self, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        out = []
        for ident in items:
            if not isinstance(ident, dict):
                continue
            raw = f"{ident.get('system', '')}|{ident.get('value', '')}"
            token = base64.b32encode(self._mac(f"identifier|{raw}")).decode("ascii")[:26].lower()
            out.append({"system": PSEUDONYM_SYSTEM, "value": token})  # SSN, MRN, plan, account, licence (7-11)
            self.counts["identifiers-pseudonymized"] += 1
        return out if isinstance(value, list) else (out[0] if out else None)

    def _addresses(self, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        out = []
        for address in items:
            if not isinstance(address, dict):
                continue
            kept = {k: address[k] for k in ("use", "type", "state", "country") if k in address}
            country = (address.get("country") or "US").upper()
            postal = re.sub(r"\D", "", str(address.get("postalCode") or ""))
            if postal and country in ("US", "USA", "UNITED STATES"):
                zip3 = postal[:3] if len(postal) >= 3 else ""
                if zip3 in RESTRICTED_ZIP3:
                    self.counts["zip3-restricted"] += 1
                    zip3 = "000"
                if zip3:
                    kept["postalCode"] = zip3
            self.counts["addresses-generalized"] += 1  # geographic subdivisions below a state (2)
            out.append(kept)
        return out if isinstance(value, list) else (out[0] if out else None)

    def _reference(self, value: str) -> str:
        if value.startswith(("#", "urn:")):
            return value
        parts = value.split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) < 2 or not parts[-2][:1].isupper():
            self.counts["references-removed"] += 1
            return "#"  # a canonical or external URL: nothing to re-link, and it could identify
        self.counts["references-rewritten"] += 1
        return f"{parts[-2]}/{self.pseudonym(parts[-2], parts[-1])}"

    def _date(self, value: str, shift: int | None) -> str:
        m = _DATE.match(value)
        if shift is None:
            self.counts["dates-reduced-to-year"] += 1
            # a timestamp keeps only its year as midnight UTC on 1 January: instant elements need a time
            return m.group(1) if not m.group(6) else f"{m.group(1)}-01-01T00:00:00Z"
        self.counts["dates-shifted"] += 1
        delta = timedelta(days=shift)
        if m.group(6):
            text = value.replace("Z", "+00:00")
            parsed = datetime.fromisoformat(text if m.group(12) else text + "+00:00")
            shifted = (parsed + delta).isoformat()
            return shifted.replace("+00:00", "Z") if value.endswith("Z") or not m.group(12) else shifted
        if m.group(5):
            return (date.fromisoformat(value) + delta).isoformat()
        if m.group(3):
            return (date(int(m.group(1)), int(m.group(3)), 15) + delta).isoformat()[:7]
        return value

    def report(self) -> dict:
        """What was changed, by rule: ``{rule: count}`` plus the mode (never the key)."""
        return {"method": "HIPAA Safe Harbor, 45 CFR 164.514(b)(2)", "dateMode": self.date_mode,
                "freeText": "removed (narrative, notes, descriptions, string extensions); not scanned",
                "changes": dict(sorted(self.counts.items()))}
