"""The map-update workflow over the FHIR store: import a draft version, diff, impact preview, publish,
roll back, each change recorded as an AuditEvent; plus the active maps the server translates with.

Map versions are ConceptMap resources (``status`` draft / active / retired, ``version``) stored
through ``fhir_ops.store.Store`` only, so the workflow runs the same on the embedded and remote stores.
"""
from __future__ import annotations

import datetime as dt
import uuid

from fhir_ops.errors import Conflict, NotFound, Unprocessable
from terminology.catalog import Catalog, shipped
from terminology.conceptmap import MapSet, iter_mappings
from terminology.harmonize import ADDABLE, Harmonizer
from terminology.mapfile import check_concept_map, parse_csv

WORKFLOW_TAGS = "https://trialtwin.org/fhir/CodeSystem/terminology-workflow"
AUDIT_ACTIONS = "https://trialtwin.org/fhir/CodeSystem/terminology-action"
#: where each resource type keeps the code a map re-codes, and its token search parameter
RECODED_ELEMENTS = {"Observation": ("code", "code"), "Condition": ("code", "code"), "AdverseEvent": ("event", "event")}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _all(store, resource_type: str, params: list[tuple[str, str]]) -> list[dict]:
    """Every match of a search, following pages (the store may cap ``_count``)."""
    out, offset = [], 0
    while True:
        page = store.search(resource_type, [*params, ("_count", "500"), ("_offset", str(offset))])
        out.extend(page.matches)
        offset += len(page.matches)
        if not page.matches or (page.total is not None and offset >= page.total) or len(page.matches) < page.count:
            return out


def versions(store, url: str) -> list[dict]:
    """All stored versions of one map (any status), oldest publication first."""
    found = [r for r in _all(store, "ConceptMap", [("url", url)]) if r.get("url") == url]
    return sorted(found, key=lambda r: (r.get("date") or "", r.get("meta", {}).get("lastUpdated") or ""))


def active_version(store, url: str) -> dict | None:
    """The active version of a map, or None when none has been published."""
    active = [r for r in versions(store, url) if r.get("status") == "active"]
    if len(active) > 1:
        raise Conflict(f"concept map '{url}' has {len(active)} active versions; publish or roll back to repair",
                       error_id="several-active-versions")
    return active[0] if active else None


def seed(store) -> list[dict]:
    """Store the shipped maps as their first active version where the store has no version yet."""
    created = []
    for cm in shipped("ConceptMap"):
        if not versions(store, cm["url"]):
            body = {k: v for k, v in cm.items() if k != "id"}
            created.append(store.create(body).resource)
    return created


def active_maps(store) -> list[dict]:
    """The ConceptMaps in force: the active version of every map in the store, else the shipped one."""
    stored = [r for r in _all(store, "ConceptMap", [("status", "active")]) if r.get("status") == "active"]
    urls = {r.get("url") for r in stored}
    return stored + [cm for cm in shipped("ConceptMap") if cm["url"] not in urls]


_harmonizers: dict[tuple, Harmonizer] = {}
_mapsets: dict[tuple, MapSet] = {}


def _built_once(cache: dict, key: tuple, build):
    """Indexes are built once per combination of map versions; a small cache bounds the memory."""
    value = cache.get(key)
    if value is None:
        if len(cache) > 16:
            cache.clear()
        value = cache[key] = build()
    return value


def _versions_key(maps: list[dict]) -> tuple:
    return tuple(sorted((m.get("url"), m.get("version"), m.get("id"), m.get("meta", {}).get("versionId")) for m in maps))


def active_harmonizer(store, catalog: Catalog | None = None) -> Harmonizer:
    """A Harmonizer for the store's active maps, built once per combination of map versions."""
    maps = active_maps(store)
    key = (_versions_key(maps), id(catalog) if catalog is not None else None)
    return _built_once(_harmonizers, key, lambda: Harmonizer(_built_once(_mapsets, key[0], lambda: MapSet(maps)),
                                                               catalog))


def audit_event(action: str, subtype: str, concept_map: dict, *, agent: str = "trialtwin-terminology",
                detail: str | None = None, outcome: str = "0") -> dict:
    """An R4 AuditEvent recording one change to a map version."""
    entity = {"what": {"reference": f"ConceptMap/{concept_map['id']}"} if concept_map.get("id") else
              {"display": f"{concept_map.get('url')}|{concept_map.get('version')}"},
              "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                       "display": "System Object"},
              "name": f"{concept_map.get('url')}|{concept_map.get('version')}"}
    if detail:
        entity["description"] = detail
    return {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100",
                 "display": "Application Activity"},
        "subtype": [{"system": AUDIT_ACTIONS, "code": subtype}],
        "action": action,
        "recorded": _now(),
        "outcome": outcome,
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                                        "code": "humanuser", "display": "human user"}]},
                   "who": {"display": agent}, "requestor": True}],
        "source": {"observer": {"display": "TrialTwin terminology service"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                             "display": "Application Server"}]},
        "entity": [entity],
    }


def _store_draft(store, draft: dict, agent: str) -> dict:
    clash = [r for r in versions(store, draft["url"]) if r.get("version") == draft["version"]]
    if clash:
        raise Conflict(f"concept map '{draft['url']}' already has a version '{draft['version']}' "
                       f"(ConceptMap/{clash[0].get('id')}, {clash[0].get('status')}); choose a new version",
                       error_id="map-version-exists")
    draft = dict(draft, status="draft", date=_now())
    audit = audit_event("C", "import", {"url": draft["url"], "version": draft["version"]}, agent=agent,
                        detail=f"imported draft with {sum(1 for _ in iter_mappings(draft))} mapping row(s)")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": draft, "request": {"method": "POST", "url": "ConceptMap"}},
        {"resource": audit, "request": {"method": "POST", "url": "AuditEvent"}}]}
    bundle["entry"][1]["resource"]["entity"][0]["what"] = {"reference": bundle["entry"][0]["fullUrl"]}
    response = store.transaction(bundle)
    location = response["entry"][0]["response"]["location"]
    return store.read("ConceptMap", location.split("/")[1])


def import_csv(store, text: str, *, url: str, version: str, agent: str = "trialtwin-terminology",
               catalog: Catalog | None = None, **meta) -> dict:
    """Import a mapping CSV as a new draft version; returns the stored draft ConceptMap.

    Raises
    ------
    InvalidRequest
        400 with one issue per bad line (nothing stored).
    Conflict
        409 when the map already has this version.
    """
    draft = parse_csv(text, url=url, version=version, catalog=catalog, **meta)
    return _store_draft(store, draft, agent)


def import_concept_map(store, resource: dict, *, agent: str = "trialtwin-terminology",
                       catalog: Catalog | None = None) -> dict:
    """Import a ConceptMap resource as a new draft version (whatever status it carried)."""
    return _store_draft(store, check_concept_map(resource, catalog=catalog), agent)


def _table(cm: dict | None) -> dict[tuple[str, str], set[tuple]]:
    table: dict[tuple[str, str], set[tuple]] = {}
    for m in iter_mappings(cm or {}):
        table.setdefault((m.source_system, m.source_code), set()).add((m.target_system, m.target_code, m.equivalence))
    return table


def diff(old: dict | None, new: dict) -> dict:
    """What changes between two versions of a map, per source code.

    Returns
    -------
    dict
        ``{"from": "url|version" or None, "to": ..., "added": [...], "removed": [...],
        "changed": [...], "unchanged": n}``; each entry names the source system and code and the
        targets (``system``, ``code``, ``equivalence``) before and/or after.
    """
    before, after = _table(old), _table(new)

    def targets(rows):
        return [{"system": s, "code": c, "equivalence": e} for s, c, e in sorted(rows, key=lambda r: (r[0], r[1] or "", r[2]))]

    out = {"from": f"{old['url']}|{old.get('version')}" if old else None, "to": f"{new['url']}|{new.get('version')}",
           "added": [], "removed": [], "changed": [], "unchanged": 0}
    for key in sorted(set(before) | set(after)):
        system, code = key
        if key not in before:
            out["added"].append({"system": system, "code": code, "after": targets(after[key])})
        elif key not in after:
            out["removed"].append({"system": system, "code": code, "before": targets(before[key])})
        elif before[key] != after[key]:
            out["changed"].append({"system": system, "code": code, "before": targets(before[key]),
                                   "after": targets(after[key])})
        else:
            out["unchanged"] += 1
    return out


def _addable(rows: set[tuple]) -> set[tuple]:
    return {(s, c) for s, c, e in rows if e in ADDABLE and c}


def preview(store, draft_id: str, *, examples: int = 3) -> dict:
    """Impact of publishing a draft: which stored resources would be re-coded.

    A resource is re-coded when it carries a source code whose standard coding(s) added on ingest
    differ between the active version and the draft.

    Returns
    -------
    dict
        ``{"draft": "url|version", "active": ..., "diff": {...}, "total": n, "codes": [{"system",
        "code", "before", "after", "resources": {type: {"count", "examples"}}}]}``.
    """
    draft = store.read("ConceptMap", draft_id)
    active = active_version(store, draft["url"])
    before, after = _table(active), _table(draft)
    codes, total = [], 0
    for key in sorted(set(before) | set(after)):
        old, new = _addable(before.get(key, set())), _addable(after.get(key, set()))
        if old == new:
            continue
        system, code = key
        per_type = {}
        for rtype, (_, param) in RECODED_ELEMENTS.items():
            page = store.search(rtype, [(param, f"{system}|{code}"), ("_count", str(examples))])
            count = page.total if page.total is not None else len(page.matches)
            if count:
                per_type[rtype] = {"count": count,
                                   "examples": [f"{rtype}/{r['id']}" for r in page.matches[:examples]]}
                total += count
        codes.append({"system": system, "code": code,
                      "before": [{"system": s, "code": c} for s, c in sorted(old)],
                      "after": [{"system": s, "code": c} for s, c in sorted(new)],
                      "resources": per_type})
    return {"draft": f"{draft['url']}|{draft.get('version')}",
            "active": f"{active['url']}|{active.get('version')}" if active else None,
            "diff": diff(active, draft), "total": total, "codes": codes}


def _tagged(cm: dict, code: str) -> bool:
    return any(t.get("system") == WORKFLOW_TAGS and t.get("code") == code for t in cm.get("meta", {}).get("tag", []))


def _put(cm: dict, **changes) -> dict:
    body = {k: v for k, v in cm.items() if k != "meta"}
    tags = [t for t in cm.get("meta", {}).get("tag", []) if t.get("system") != WORKFLOW_TAGS]
    add = changes.pop("_tag", None)
    if add:
        tags.append({"system": WORKFLOW_TAGS, "code": add})
    if tags:
        body["meta"] = {"tag": tags}
    body.update(changes)
    entry = {"resource": body, "request": {"method": "PUT", "url": f"ConceptMap/{cm['id']}"}}
    version_id = cm.get("meta", {}).get("versionId")
    if version_id:
        entry["request"]["ifMatch"] = f'W/"{version_id}"'
    return entry


def publish(store, draft_id: str, *, agent: str = "trialtwin-terminology") -> dict:
    """Make a draft the active version of its map; the previous active version is retired.

    One transaction carries both status changes and the AuditEvent, so a failure leaves no map
    half-published. Returns the published ConceptMap.
    """
    draft = store.read("ConceptMap", draft_id)
    if draft.get("status") != "draft":
        raise Unprocessable(f"ConceptMap/{draft_id} is {draft.get('status')}, not a draft; only drafts are published",
                            error_id="not-a-draft")
    active = active_version(store, draft["url"])
    entries = [_put(draft, status="active", date=_now())]
    if active is not None:
        entries.append(_put(active, status="retired"))
    detail = f"published version {draft.get('version')}" + (f", retiring {active.get('version')}" if active else "")
    entries.append({"resource": audit_event("U", "publish", draft, agent=agent, detail=detail),
                    "request": {"method": "POST", "url": "AuditEvent"}})
    store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return store.read("ConceptMap", draft_id)


def rollback(store, url: str, *, agent: str = "trialtwin-terminology") -> dict:
    """Return a map to its previous published version; the current one is retired (tagged rolled-back).

    Returns the version that is active afterwards.
    """
    history = versions(store, url)
    if not history:
        raise NotFound(f"concept map '{url}' has no stored versions", error_id="unknown-concept-map")
    active = active_version(store, url)
    if active is None:
        raise Unprocessable(f"concept map '{url}' has no active version to roll back", error_id="nothing-to-roll-back")
    earlier = [r for r in history if r.get("status") == "retired" and not _tagged(r, "rolled-back")
               and (r.get("date") or "") <= (active.get("date") or "")]
    if not earlier:
        raise Unprocessable(f"concept map '{url}' version {active.get('version')} is its first published version; "
                            "there is nothing to roll back to", error_id="nothing-to-roll-back")
    previous = earlier[-1]
    detail = f"rolled back from version {active.get('version')} to {previous.get('version')}"
    entries = [_put(active, status="retired", _tag="rolled-back"), _put(previous, status="active"),
               {"resource": audit_event("U", "rollback", previous, agent=agent, detail=detail),
                "request": {"method": "POST", "url": "AuditEvent"}}]
    store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return store.read("ConceptMap", previous["id"])


__all__ = ["RECODED_ELEMENTS", "active_harmonizer", "active_maps", "active_version", "audit_event", "diff",
           "import_concept_map", "import_csv", "preview", "publish", "rollback", "seed", "versions"]


def active_mapset(store) -> MapSet:
    """The store's active maps as a ``MapSet``, indexed once per combination of map versions."""
    maps = active_maps(store)
    return _built_once(_mapsets, _versions_key(maps), lambda: MapSet(maps))


__all__ += ["active_mapset"]


def unmapped_report(store) -> dict:
    """The unmapped-codes report over stored data: local codes on Observations, Conditions and
    AdverseEvents that the active maps give no standard coding, with counts."""
    from terminology.harmonize import UnmappedReport

    harmonizer, report = active_harmonizer(store), UnmappedReport()
    for rtype in RECODED_ELEMENTS:
        for resource in _all(store, rtype, []):
            harmonizer.harmonize(resource, report)
    return report.to_dict()


__all__ += ["unmapped_report"]
