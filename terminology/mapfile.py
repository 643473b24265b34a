"""Reading a new ConceptMap version from the documented CSV layout or from ConceptMap JSON, with
line-level (or element-level) validation: every problem is reported, and nothing is returned on error.
"""
from __future__ import annotations

import csv
import io
import re

from fhir_ops.errors import InvalidRequest, outcome
from terminology.catalog import Catalog, default_catalog
from terminology.checkdigits import CHECKERS

#: the CSV columns, in the documented order (docs/terminology.md); the header row is required
COLUMNS = ("source_system", "source_code", "source_display", "target_system", "target_code",
           "target_display", "equivalence", "comment")
REQUIRED = ("source_system", "source_code", "target_system", "equivalence")
#: R4 ConceptMapEquivalence (http://hl7.org/fhir/R4/valueset-concept-map-equivalence.html)
EQUIVALENCES = ("relatedto", "equivalent", "equal", "wider", "subsumes", "narrower", "specializes",
                "inexact", "unmatched", "disjoint")
_NO_TARGET = {"unmatched"}
_URI = re.compile(r"^(https?://\S+|urn:\S+)$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_+]{0,63}$")
MAX_ROWS = 200_000


def _row_problems(row: dict, catalog: Catalog) -> list[str]:
    problems = []
    for col in REQUIRED:
        if not row.get(col):
            problems.append(f"'{col}' is empty")
    for col in ("source_system", "target_system"):
        if row.get(col) and not _URI.match(row[col]):
            problems.append(f"'{col}' must be an absolute URI (http(s):// or urn:), got '{row[col]}'")
    for col in ("source_code", "target_code"):
        if row.get(col) and (row[col] != row[col].strip() or any(ch.isspace() and ch != " " for ch in row[col])):
            problems.append(f"'{col}' has leading/trailing or control whitespace: {row[col]!r}")
    eq = row.get("equivalence")
    if eq and eq not in EQUIVALENCES:
        problems.append(f"equivalence '{eq}' is not an R4 ConceptMapEquivalence ({', '.join(EQUIVALENCES)})")
    target = row.get("target_code")
    if eq in _NO_TARGET and target:
        problems.append(f"equivalence '{eq}' must have an empty target_code")
    if eq and eq not in _NO_TARGET and not target:
        problems.append(f"equivalence '{eq}' needs a target_code")
    if target and row.get("target_system"):
        checker = CHECKERS.get(row["target_system"])
        if checker and not checker[0](target):
            problems.append(f"target_code '{target}' is not {checker[1]}")
        cs = catalog.code_system(row["target_system"])
        if cs is not None and cs.resource.get("content") == "complete" and target not in cs.concepts:
            problems.append(f"target_code '{target}' is not in code system '{row['target_system']}'")
    if row.get("source_system") and row.get("source_code"):
        cs = catalog.code_system(row["source_system"])
        if cs is not None and cs.resource.get("content") == "complete" and row["source_code"] not in cs.concepts:
            problems.append(f"source_code '{row['source_code']}' is not in code system '{row['source_system']}'")
    return problems


def _raise(issues: list[dict], what: str) -> None:
    n = len(issues)
    raise InvalidRequest(f"{what}: {n} problem(s); nothing was stored", error_id="invalid-map",
                         extra_issues=issues)


def _check_header(url: str | None, version: str | None) -> list[dict]:
    issues = []
    if not url or not _URI.match(url):
        issues.append(outcome("error", "required", f"the map needs an absolute canonical url, got {url!r}",
                              error_id="invalid-map-url", expression=["ConceptMap.url"]))
    if not version or not _VERSION.match(version):
        issues.append(outcome("error", "required", f"the map needs a version (letters, digits, . - _ +), got {version!r}",
                              error_id="invalid-map-version", expression=["ConceptMap.version"]))
    return issues


def rows_to_concept_map(rows: list[dict], *, url: str, version: str, name: str | None = None,
                        title: str | None = None, source_scope: str | None = None,
                        target_scope: str | None = None) -> dict:
    """Group flat mapping rows into an R4 ConceptMap (status draft)."""
    groups: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["source_system"], row["target_system"])
        group = groups.setdefault(key, {"source": key[0], "target": key[1], "element": [], "_by_code": {}})
        element = group["_by_code"].get(row["source_code"])
        if element is None:
            element = {"code": row["source_code"]}
            if row.get("source_display"):
                element["display"] = row["source_display"]
            element["target"] = []
            group["_by_code"][row["source_code"]] = element
            group["element"].append(element)
        target = {}
        if row.get("target_code"):
            target["code"] = row["target_code"]
        if row.get("target_display"):
            target["display"] = row["target_display"]
        target["equivalence"] = row["equivalence"]
        if row.get("comment"):
            target["comment"] = row["comment"]
        element["target"].append(target)
    cm = {"resourceType": "ConceptMap", "url": url, "version": version,
          "name": name or re.sub(r"[^A-Za-z0-9_]", "", url.rstrip("/").rsplit("/", 1)[-1].title().replace("-", "")) or "ImportedMap",
          "status": "draft", "experimental": False}
    if title:
        cm["title"] = title
    if source_scope:
        cm["sourceUri"] = source_scope
    if target_scope:
        cm["targetUri"] = target_scope
    cm["group"] = [{k: v for k, v in g.items() if k != "_by_code"} for g in groups.values()]
    return cm


def parse_csv(text: str, *, url: str, version: str, catalog: Catalog | None = None, **meta) -> dict:
    """Parse and validate a mapping CSV into a draft ConceptMap.

    Parameters
    ----------
    text : str
        CSV text with a header row naming the columns of :data:`COLUMNS` (any order; unknown
        columns are refused, ``source_display``, ``target_display`` and ``comment`` may be left out).
    url, version : str
        Canonical url and version of the map version being imported.
    catalog : Catalog, optional
        Code systems used to check codes of complete (local) code systems.

    Returns
    -------
    dict
        The ConceptMap (status ``draft``, no id).

    Raises
    ------
    InvalidRequest
        400 with one OperationOutcome issue per problem, each naming its physical line
        (``expression`` ``line[N]``, 1-based, the header being line 1).
    """
    catalog = catalog or default_catalog()
    issues = _check_header(url, version)
    if text.startswith("\ufeff"):
        text = text[1:]  # spreadsheet exports often start with a byte-order mark
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as exc:
        _raise([outcome("error", "structure", f"line 1: {exc}", error_id="invalid-csv", expression=["line[1]"])], "invalid CSV")
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in COLUMNS]
    missing = [c for c in REQUIRED if c not in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if not header or unknown or missing or dupes:
        msg = "line 1: the header row " + "; ".join(filter(None, [
            "is empty" if not header else "",
            f"has unknown column(s) {', '.join(unknown)}" if unknown else "",
            f"lacks required column(s) {', '.join(missing)}" if missing else "",
            f"repeats column(s) {', '.join(dupes)}" if dupes else ""])) + f" (columns: {', '.join(COLUMNS)})"
        _raise(issues + [outcome("error", "structure", msg, error_id="invalid-csv-header", expression=["line[1]"])],
               "invalid CSV header")
    rows, seen = [], {}
    line_start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            issues.append(outcome("error", "structure", f"line {reader.line_num}: {exc}", error_id="invalid-csv",
                                  expression=[f"line[{reader.line_num}]"]))
            break
        line, line_start = line_start, reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue
        if len(rows) >= MAX_ROWS:
            issues.append(outcome("error", "too-costly", f"line {line}: more than {MAX_ROWS} rows", error_id="too-many-rows",
                                  expression=[f"line[{line}]"]))
            break
        if len(record) != len(header):
            issues.append(outcome("error", "structure",
                                  f"line {line}: {len(record)} field(s), the header has {len(header)}",
                                  error_id="invalid-csv-row", expression=[f"line[{line}]"]))
            continue
        row = {col: cell.strip() if col not in ("source_code", "target_code") else cell for col, cell in zip(header, record)}
        problems = _row_problems(row, catalog)
        key = (row.get("source_system"), row.get("source_code"), row.get("target_system"), row.get("target_code"))
        if not problems and key in seen:
            problems.append(f"repeats the mapping of line {seen[key]}")
        seen.setdefault(key, line)
        for p in problems:
            issues.append(outcome("error", "value", f"line {line}: {p}", error_id="invalid-csv-row",
                                  expression=[f"line[{line}]"]))
        rows.append(row)
    if not rows and not issues:
        issues.append(outcome("error", "required", "the CSV has a header but no mapping rows",
                              error_id="empty-map", expression=["line[2]"]))
    if issues:
        _raise(issues, "the mapping CSV was rejected")
    return rows_to_concept_map(rows, url=url, version=version, **meta)


def check_concept_map(resource: dict, *, catalog: Catalog | None = None) -> dict:
    """Validate an uploaded ConceptMap (R4 structure plus the CSV rules per target); return a draft copy.

    Raises
    ------
    InvalidRequest
        400 with one issue per problem, each with a FHIRPath ``expression``
        (``ConceptMap.group[0].element[3].target[0]``).
    """
    catalog = catalog or default_catalog()
    if not isinstance(resource, dict) or resource.get("resourceType") != "ConceptMap":
        raise InvalidRequest("the body must be a ConceptMap resource", error_id="invalid-map")
    issues = _check_header(resource.get("url"), resource.get("version"))
    try:
        from fhir.resources.R4B.conceptmap import ConceptMap

        ConceptMap.model_validate({k: v for k, v in resource.items() if k not in ("meta",)})
    except Exception as exc:  # pydantic's ValidationError: report its first lines, structurally
        for line in str(exc).splitlines()[1:7]:
            issues.append(outcome("error", "structure", f"not a valid R4 ConceptMap: {line.strip()}",
                                  error_id="invalid-resource", expression=["ConceptMap"]))
        # a map that is not even structurally a ConceptMap ("group": "x") has no rows to check
        _raise(issues, "the ConceptMap was rejected")
    seen = {}
    for gi, group in enumerate(resource.get("group") or []):
        for ei, element in enumerate(group.get("element") or []):
            for ti, target in enumerate(element.get("target") or [{}]):
                row = {"source_system": group.get("source"), "source_code": element.get("code"),
                       "target_system": group.get("target"), "target_code": target.get("code"),
                       "equivalence": target.get("equivalence")}
                where = f"ConceptMap.group[{gi}].element[{ei}].target[{ti}]"
                problems = _row_problems(row, catalog)
                key = (row["source_system"], row["source_code"], row["target_system"], row["target_code"])
                if not problems and key in seen:
                    problems.append(f"repeats the mapping at {seen[key]}")
                seen.setdefault(key, where)
                issues.extend(outcome("error", "value", f"{where}: {p}", error_id="invalid-map-element",
                                      expression=[where]) for p in problems)
    if not resource.get("group"):
        issues.append(outcome("error", "required", "the ConceptMap has no group", error_id="empty-map",
                              expression=["ConceptMap.group"]))
    if issues:
        _raise(issues, "the ConceptMap was rejected")
    draft = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    draft["status"] = "draft"
    return draft


__all__ = ["COLUMNS", "EQUIVALENCES", "REQUIRED", "check_concept_map", "parse_csv", "rows_to_concept_map"]
