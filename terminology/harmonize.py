"""Harmonization on ingest: add the standard coding to local codes and bring quantities to canonical UCUM.

``Harmonizer`` is built once per set of active map versions; ``harmonize_resource`` is the hook the
store / transaction layer calls for each incoming Observation, Condition or AdverseEvent.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fhir_ops.errors import outcome
from terminology import ucum
from terminology.catalog import LOINC, SNOMED, UCUM, Catalog, default_catalog, shipped
from terminology.conceptmap import MapSet

ORIGINAL_QUANTITY = "https://trialtwin.org/fhir/StructureDefinition/original-quantity"
#: equivalences close enough to put the target into the same CodeableConcept
ADDABLE = frozenset({"equal", "equivalent"})
_STUDY_SYSTEMS = frozenset({"https://trialtwin.org/fhir/CodeSystem/assay",
                            "https://trialtwin.org/fhir/CodeSystem/investigational-product"})


@dataclass
class UnmappedReport:
    """Unmapped codes seen across many resources: ``(system, code) -> count`` plus where they came from."""

    counts: Counter = field(default_factory=Counter)
    displays: dict = field(default_factory=dict)
    resource_types: dict = field(default_factory=dict)

    def record(self, system: str | None, code: str | None, display: str | None, resource_type: str) -> None:
        key = (system or "", code or "")
        self.counts[key] += 1
        if display:
            self.displays.setdefault(key, display)
        self.resource_types.setdefault(key, set()).add(resource_type)

    def to_dict(self) -> dict:
        """JSON-ready report, most frequent first."""
        return {"unmapped": [
            {"system": s, "code": c, "display": self.displays.get((s, c)), "count": n,
             "resourceTypes": sorted(self.resource_types[(s, c)])}
            for (s, c), n in self.counts.most_common()]}


class Harmonizer:
    """Pre-computed code and unit tables for one set of ConceptMap versions and code systems.

    Parameters
    ----------
    maps : MapSet or list of dict
        The active ConceptMaps.
    catalog : Catalog, optional
        Code systems giving each standard code's canonical unit and analyte molar mass.
    """

    def __init__(self, maps: MapSet | list[dict], catalog: Catalog | None = None) -> None:
        maps = maps if isinstance(maps, MapSet) else MapSet(maps)
        self.catalog = catalog or default_catalog()
        self.targets: dict[tuple[str, str], list[dict]] = {}
        self.local_systems: set[str] = set()
        standard = {LOINC, SNOMED, UCUM, *_STUDY_SYSTEMS}
        for idx in maps.maps:
            for (system, code), rows in idx.forward.items():
                self.local_systems.add(system)
                for m in rows:
                    standard.add(m.target_system)
                    if m.equivalence in ADDABLE and m.target_code:
                        coding = {"system": m.target_system, "code": m.target_code}
                        if m.target_display:
                            coding["display"] = m.target_display
                        self.targets.setdefault((system, code), []).append(coding)
        self.standard_systems = frozenset(standard - self.local_systems)
        self._units: dict[tuple[str, str], tuple[str, object]] = {}
        self._conversions: dict[tuple, tuple] = {}

    @classmethod
    def shipped(cls) -> "Harmonizer":
        """A harmonizer over the shipped maps (tests, demo, and before any map is published)."""
        return cls(shipped("ConceptMap"))

    def canonical_unit(self, system: str, code: str) -> tuple[str, object] | None:
        key = (system, code)
        if key not in self._units:
            unit = self.catalog.property_value(system, code, "canonical-unit")
            self._units[key] = (unit, self.catalog.property_value(system, code, "molar-mass")) if unit else None
        return self._units[key]

    def _factor(self, src: str, dst: str, molar_mass):
        key = (src, dst, molar_mass)
        conv = self._conversions.get(key)
        if conv is None:
            conv = self._conversions[key] = ucum.conversion(src, dst, molar_mass=molar_mass)
        return conv

    # -- the work ---------------------------------------------------------------------------------
    def _concept(self, cc: dict | None, path: str, rtype: str, warnings: list, report) -> tuple[dict | None, dict | None]:
        """Return (possibly new CodeableConcept, the standard coding it carries)."""
        if not cc:
            return cc, None
        codings = cc.get("coding") or []
        standard = next((c for c in codings if c.get("system") in self.standard_systems), None)
        added = []
        for i, c in enumerate(codings):
            system = c.get("system")
            if system in self.standard_systems:
                continue
            targets = self.targets.get((system, c.get("code")))
            if targets:
                for t in targets:
                    if not any(o.get("system") == t["system"] and o.get("code") == t["code"] for o in codings + added):
                        added.append(dict(t))
                continue
            if standard is None:
                warnings.append(outcome(
                    "warning", "code-invalid",
                    f"no standard coding for '{system}|{c.get('code')}' (no equivalent mapping in the active "
                    "concept maps); stored as received", error_id="unmapped-code",
                    expression=[f"{path}.coding[{i}]"]))
                if report is not None:
                    report.record(system, c.get("code"), c.get("display"), rtype)
        if not added:
            return cc, standard
        new = dict(cc)
        new["coding"] = [*codings, *added]
        return new, standard or added[0]

    def _quantity(self, qty: dict, standard: dict | None, path: str, warnings: list) -> dict:
        if not standard:
            return qty
        canon = self.canonical_unit(standard.get("system"), standard.get("code"))
        if canon is None:
            return qty
        unit, molar_mass = canon
        src = qty.get("code") if qty.get("system") == UCUM else (qty.get("code") or qty.get("unit"))
        if src == unit or not isinstance(qty.get("value"), (int, float)):
            return qty
        if not src:
            warnings.append(outcome("warning", "value", f"quantity has no unit; expected '{unit}'",
                                    error_id="missing-unit", expression=[path]))
            return qty
        try:
            pre, factor, post = self._factor(src, unit, molar_mass)
        except ucum.UcumError as exc:
            warnings.append(outcome("warning", "value", f"value kept in '{src}': {exc}",
                                    error_id="unit-not-convertible", expression=[path]))
            return qty
        original = {k: v for k, v in qty.items() if k != "extension"}
        new = {k: v for k, v in qty.items() if k not in ("value", "unit", "system", "code")}
        # exact rational arithmetic on the decimal as sent, rounded once: 5.5 mmol/L -> 99.0858 mg/dL
        new["value"] = float((ucum.exact_decimal(qty["value"]) + pre) * factor - post)
        new.update({"unit": unit, "system": UCUM, "code": unit})
        new["extension"] = [*qty.get("extension", []), {"url": ORIGINAL_QUANTITY, "valueQuantity": original}]
        return new

    def harmonize(self, resource: dict, report: UnmappedReport | None = None) -> tuple[dict, list[dict]]:
        """Harmonize one resource; the input is never modified.

        Returns
        -------
        (dict, list of dict)
            The harmonized resource (shares unchanged parts with the input) and OperationOutcome
            warning issues for unmapped codes and unconvertible units.
        """
        rtype = resource.get("resourceType")
        warnings: list[dict] = []
        if rtype == "Observation":
            out = dict(resource)
            cc, std = self._concept(resource.get("code"), "Observation.code", rtype, warnings, report)
            if cc is not resource.get("code"):
                out["code"] = cc
            if "valueQuantity" in resource:
                out["valueQuantity"] = self._quantity(resource["valueQuantity"], std, "Observation.valueQuantity", warnings)
            if "component" in resource:
                comps = []
                for i, comp in enumerate(resource["component"]):
                    p = f"Observation.component[{i}]"
                    ccc, cstd = self._concept(comp.get("code"), f"{p}.code", rtype, warnings, report)
                    new = dict(comp)
                    if ccc is not comp.get("code"):
                        new["code"] = ccc
                    if "valueQuantity" in comp:
                        new["valueQuantity"] = self._quantity(comp["valueQuantity"], cstd, f"{p}.valueQuantity", warnings)
                    comps.append(new)
                out["component"] = comps
            return out, warnings
        if rtype in ("Condition", "AdverseEvent"):
            key = "code" if rtype == "Condition" else "event"
            cc, _ = self._concept(resource.get(key), f"{rtype}.{key}", rtype, warnings, report)
            if cc is resource.get(key):
                return resource, warnings
            out = dict(resource)
            out[key] = cc
            return out, warnings
        return resource, warnings


_default: Harmonizer | None = None


def harmonize_resource(resource: dict, *, harmonizer: Harmonizer | None = None,
                       report: UnmappedReport | None = None) -> tuple[dict, list[dict]]:
    """The ingest hook: harmonize one incoming resource.

    Parameters
    ----------
    resource : dict
        Any FHIR resource; only Observation, Condition and AdverseEvent are changed.
    harmonizer : Harmonizer, optional
        Built from the store's active maps (``terminology.workflow.active_harmonizer(store)``);
        the shipped maps are used when omitted.
    report : UnmappedReport, optional
        Collects unmapped codes across a batch / transaction / bulk import.

    Returns
    -------
    (dict, list of dict)
        The resource to store and OperationOutcome warning issues to put in the response.
    """
    global _default
    if harmonizer is None:
        if _default is None:
            _default = Harmonizer.shipped()
        harmonizer = _default
    return harmonizer.harmonize(resource, report)


harmonize = harmonize_resource


def harmonize_bundle(bundle: dict, *, harmonizer: Harmonizer | None = None,
                     report: UnmappedReport | None = None) -> tuple[dict, dict[int, list[dict]]]:
    """Harmonize every POST/PUT resource of a transaction or batch Bundle (the input is not modified).

    Returns
    -------
    (dict, dict)
        The Bundle to apply, and ``{entry index: [warning issues]}`` for entries that have warnings;
        pass both to :func:`attach_outcomes` with the store's response.
    """
    entries, warnings = [], {}
    for i, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource")
        method = (entry.get("request") or {}).get("method")
        if isinstance(resource, dict) and method in ("POST", "PUT"):
            new, issues = harmonize_resource(resource, harmonizer=harmonizer, report=report)
            if issues:
                warnings[i] = issues
            if new is not resource:
                entry = dict(entry, resource=new)
        entries.append(entry)
    return dict(bundle, entry=entries), warnings


def attach_outcomes(response: dict, warnings: dict[int, list[dict]]) -> dict:
    """Put each entry's warnings into ``Bundle.entry.response.outcome`` of a transaction/batch response."""
    for i, issues in warnings.items():
        entry = response["entry"][i]
        entry_response = entry.setdefault("response", {})
        existing = entry_response.get("outcome")
        if existing and existing.get("resourceType") == "OperationOutcome":
            existing.setdefault("issue", []).extend(issues)
        else:
            entry_response["outcome"] = {"resourceType": "OperationOutcome", "issue": list(issues)}
    return response

__all__ = ["ADDABLE", "Harmonizer", "ORIGINAL_QUANTITY", "UnmappedReport", "attach_outcomes", "harmonize",
           "harmonize_bundle", "harmonize_resource"]
