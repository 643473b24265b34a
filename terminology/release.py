"""Loading a licensed code-system release (full LOINC, a SNOMED CT edition exported as a CodeSystem)
into the user terminology folder, where it replaces the shipped subset with the same canonical url.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from fhir_ops.errors import InvalidRequest
from terminology.catalog import LOINC, load_file, user_dir

_SAFE = re.compile(r"[^A-Za-z0-9.-]+")


def loinc_csv_to_code_system(path: str | Path, *, version: str) -> dict:
    """Convert ``LoincTable/Loinc.csv`` of a LOINC release into an R4 CodeSystem (content complete).

    Uses ``LOINC_NUM``, ``LONG_COMMON_NAME`` (display), ``SHORTNAME`` (designation), ``STATUS``
    and ``EXAMPLE_UCUM_UNITS`` (the ``canonical-unit`` property, first unit when several).
    """
    concepts = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"LOINC_NUM", "LONG_COMMON_NAME"} - set(reader.fieldnames or [])
        if missing:
            raise InvalidRequest(f"{path} is not a LOINC table (missing column(s) {', '.join(sorted(missing))})",
                                 error_id="invalid-release")
        for row in reader:
            concept = {"code": row["LOINC_NUM"], "display": row["LONG_COMMON_NAME"]}
            if row.get("SHORTNAME"):
                concept["designation"] = [{"language": "en", "use": {"system": LOINC, "code": "SHORTNAME"},
                                           "value": row["SHORTNAME"]}]
            props = []
            if row.get("STATUS"):
                props.append({"code": "STATUS", "valueString": row["STATUS"]})
            unit = (row.get("EXAMPLE_UCUM_UNITS") or "").split(";")[0].strip()
            if unit:
                props.append({"code": "canonical-unit", "valueCode": unit})
            if props:
                concept["property"] = props
            concepts.append(concept)
    return {"resourceType": "CodeSystem", "id": "loinc", "url": LOINC, "version": version, "name": "LOINC",
            "title": "LOINC", "status": "active", "content": "complete", "caseSensitive": True,
            "count": len(concepts),
            "copyright": "This material contains content from LOINC (http://loinc.org), copyright Regenstrief "
                         "Institute, Inc. and the LOINC Committee, used under the LOINC license.",
            "property": [{"code": "STATUS", "type": "string"},
                         {"code": "canonical-unit", "uri": "https://trialtwin.org/fhir/terminology/property/canonical-unit",
                          "type": "code"}],
            "concept": concepts}


def install(resource: dict, folder: Path | None = None) -> Path:
    """Write a CodeSystem or ValueSet into the user terminology folder (replacing an earlier load)."""
    rtype = resource.get("resourceType")
    if rtype not in ("CodeSystem", "ValueSet") or not resource.get("url"):
        raise InvalidRequest("a release must be a CodeSystem or ValueSet resource with a url", error_id="invalid-release")
    if rtype == "CodeSystem" and not resource.get("concept"):
        raise InvalidRequest(f"CodeSystem {resource['url']} has no concepts (content 'not-present' cannot be served)",
                             error_id="invalid-release")
    folder = folder or user_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{rtype}-{_SAFE.sub('_', resource['url'].split('://')[-1])}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(resource, ensure_ascii=False), encoding="utf-8")
    tmp.replace(target)  # atomic: a server reading the folder never sees half a file
    return target


def load_release(path: str | Path, *, loinc_version: str | None = None, folder: Path | None = None) -> Path:
    """Install a release file: a CodeSystem/ValueSet JSON, or LOINC's ``Loinc.csv`` (with ``loinc_version``)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        if not loinc_version:
            raise InvalidRequest("loading Loinc.csv needs the LOINC version (--loinc-version 2.77)",
                                 error_id="missing-parameter")
        return install(loinc_csv_to_code_system(path, version=loinc_version), folder)
    return install(load_file(path), folder)


__all__ = ["install", "load_release", "loinc_csv_to_code_system"]
