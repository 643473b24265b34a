"""Store-independent pieces of FHIR transaction/batch processing: entry parsing, ordering, references.

Kept apart from the SQLite store so the rules (FHIR R4 3.1.0.11.2) are read in one place.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from fhir_ops.errors import Gone, InvalidRequest, NotFound
from fhir_ops.urls import UrlError, encode_query, parse_condition, parse_fhir_url_cached

#: tag on the stub ``{resourceType, id, meta}`` that stands for a deleted version in ``Store.history()``
#: results (a history Bundle entry of a DELETE has no resource); any Store implementation uses the same
DELETED_TAG = {"system": "https://trialtwin.org/fhir/CodeSystem/version-state", "code": "deleted"}

#: FHIR processing order inside a transaction: DELETE, POST, PUT/PATCH, GET/HEAD
METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content", 400: "400 Bad Request",
               404: "404 Not Found", 409: "409 Conflict", 410: "410 Gone", 412: "412 Precondition Failed",
               415: "415 Unsupported Media Type", 422: "422 Unprocessable Entity", 500: "500 Internal Server Error"}


@dataclass
class EntryRequest:
    """One Bundle entry's request, parsed."""

    index: int
    method: str
    resource_type: str
    resource_id: str | None
    version_id: str | None
    query: list[tuple[str, str]] | None
    resource: dict | None
    full_url: str | None
    if_match: str | None
    if_none_exist: str | None
    #: the canonical relative request url (``Observation/1``), as parsed
    url: str = ""

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"


def parse_entries(bundle: dict, expected_type: str, *, base: str | None = None) -> list[EntryRequest]:
    """Check a transaction/batch Bundle's shape and parse every entry's request.

    Each ``request.url`` (and ``ifNoneExist``) is read by :func:`fhir_ops.urls.parse_fhir_url`, the
    parser the authorization check uses too; ``base`` is the server's own base, the only one absolute
    URLs may carry. Raises ``InvalidRequest`` naming the entry (``Bundle.entry[3].request``).
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidRequest("expected a Bundle resource", error_id="invalid-bundle", expression=["Bundle"])
    if bundle.get("type") != expected_type:
        raise InvalidRequest(f"expected Bundle.type {expected_type!r}, got {bundle.get('type')!r}",
                             error_id="invalid-bundle", expression=["Bundle.type"])
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise InvalidRequest("Bundle.entry must be a list", error_id="invalid-bundle", expression=["Bundle.entry"])
    return [parse_entry(entry, i, base=base) for i, entry in enumerate(entries)]


def _bad_url(where: str, url, why: str, error_id: str = "invalid-bundle") -> InvalidRequest:
    return InvalidRequest(f"{where}.request.url {str(url)[:200]!r} {why}", error_id=error_id,
                          expression=[f"{where}.request.url"])


def parse_entry(entry, index: int, *, base: str | None = None) -> EntryRequest:
    """Parse one Bundle entry's request (see :func:`parse_entries`)."""
    where = f"Bundle.entry[{index}]"
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{where} must be an object", error_id="invalid-bundle", expression=[where])
    req = entry.get("request")
    if not isinstance(req, dict) or not isinstance(req.get("url"), str) or not isinstance(req.get("method"), str) \
            or req["method"] not in METHOD_ORDER:
        raise InvalidRequest(f"{where}.request needs a method (GET, POST, PUT, DELETE) and a url",
                             error_id="invalid-bundle", expression=[f"{where}.request"])
    method = req["method"]
    if method == "PATCH":
        raise InvalidRequest(f"{where}: PATCH is not supported", error_id="not-supported", code="not-supported",
                             expression=[f"{where}.request.method"])
    for key in ("ifMatch", "ifNoneExist"):
        if req.get(key) is not None and not isinstance(req[key], str):
            raise InvalidRequest(f"{where}.request.{key} must be a string", error_id="invalid-bundle",
                                 expression=[f"{where}.request.{key}"])
    try:
        url = parse_fhir_url_cached(req["url"], base)
    except UrlError as exc:
        raise InvalidRequest(f"{where}.request.url: {exc}", error_id="invalid-entry-url",
                             expression=[f"{where}.request.url"]) from None
    if url.resource_type is None or url.operation is not None:
        raise _bad_url(where, req["url"], "is not a resource interaction (operations and system-level calls "
                       "are not supported inside a Bundle)", "not-supported")
    if url.history and url.version_id is None:
        raise _bad_url(where, req["url"], "is a history interaction, which is not supported inside a Bundle",
                       "not-supported")
    rtype, rid, vid = url.resource_type, url.resource_id, url.version_id
    if vid is not None and method != "GET":
        raise _bad_url(where, req["url"], f"names a version; {method} takes Type/id")
    resource = entry.get("resource")
    if resource is not None and not isinstance(resource, dict):
        raise InvalidRequest(f"{where}.resource must be a JSON object (a FHIR resource)", error_id="invalid-bundle",
                             expression=[f"{where}.resource"])
    if method in ("POST", "PUT"):
        if not isinstance(resource, dict):
            raise InvalidRequest(f"{where}: a {method} entry needs a resource", error_id="invalid-bundle",
                                 expression=[f"{where}.resource"])
        if resource.get("resourceType") != rtype:
            raise InvalidRequest(f"{where}: resource type {str(resource.get('resourceType'))[:100]!r} does not match "
                                 f"request url type {rtype!r}", error_id="type-mismatch",
                                 expression=[f"{where}.resource.resourceType"])
        if method == "PUT" and (rid is None or url.query is not None):
            raise InvalidRequest(f"{where}: PUT needs a url Type/id (conditional update is not supported)",
                                 error_id="not-supported", expression=[f"{where}.request.url"])
        if method == "POST" and (rid is not None or url.query is not None):
            raise _bad_url(where, req["url"], "must be the resource type only for a POST")
    if method == "DELETE" and (rid is None or url.query is not None):
        raise InvalidRequest(f"{where}: DELETE needs a url Type/id (conditional delete is not supported)",
                             error_id="not-supported", expression=[f"{where}.request.url"])
    if method == "GET" and rid is not None and url.query is not None:
        raise _bad_url(where, req["url"], "has both an id and a query")
    condition = None
    if req.get("ifNoneExist") is not None and method == "POST":
        try:
            condition = encode_query(parse_condition(req["ifNoneExist"], rtype, base))
        except UrlError as exc:
            raise InvalidRequest(f"{where}.request.ifNoneExist: {exc}", error_id="invalid-condition",
                                 expression=[f"{where}.request.ifNoneExist"]) from None
    return EntryRequest(
        index=index, method=method, resource_type=rtype, resource_id=rid, version_id=vid,
        query=list(url.query) if url.query is not None else None,
        resource=resource if isinstance(resource, dict) else None,
        full_url=entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None,
        if_match=req.get("ifMatch"), if_none_exist=condition, url=url.relative)


def canonical_bundle(bundle: dict, entries: list[EntryRequest]) -> dict:
    """A copy of ``bundle`` whose entries carry the parsed requests (canonical relative url, ifNoneExist).

    What the authorization check decided on is what the store then executes: the store re-reads
    these canonical URLs, which parse to the same entries.
    """
    out = dict(bundle)
    new_entries = []
    for e, original in zip(entries, bundle.get("entry") or []):
        entry = dict(original)
        request = {k: v for k, v in original["request"].items() if k not in ("url", "ifNoneExist")}
        request["url"] = e.url
        if e.if_none_exist is not None:
            request["ifNoneExist"] = e.if_none_exist
        entry["request"] = request
        new_entries.append(entry)
    out["entry"] = new_entries
    return out


def rewrite_references(node, mapping: dict[str, str]) -> None:
    """Replace, in place, every ``reference`` whose value is a key of ``mapping`` (urn:uuid fullUrls).

    Runs over every resource of a transaction with urn:uuid fullUrls, so it is written for speed:
    exact ``type`` checks (parsed JSON has no subclasses) and an explicit stack, which also keeps
    deeply nested input from hitting the recursion limit.

    Examples
    --------
    >>> obs = {"subject": {"reference": "urn:uuid:1"}, "note": [{"text": "urn:uuid:1"}]}
    >>> rewrite_references(obs, {"urn:uuid:1": "Patient/p1"})
    >>> obs["subject"], obs["note"][0]
    ({'reference': 'Patient/p1'}, {'text': 'urn:uuid:1'})
    """
    stack = [node]
    pop, push = stack.pop, stack.append
    while stack:
        cur = pop()
        if type(cur) is dict:
            for k, v in cur.items():
                t = type(v)
                if t is str:
                    if k == "reference":
                        new = mapping.get(v)
                        if new is not None:
                            cur[k] = new  # same key: the dict's size does not change while iterating
                elif t is dict or t is list:
                    push(v)
        elif type(cur) is list:
            for x in cur:
                t = type(x)
                if t is dict or t is list:
                    push(x)


def response_entry(status: int, resource: dict | None = None, *, include_resource: bool = False) -> dict:
    """A transaction/batch response entry with location, etag and lastModified from ``resource``."""
    response: dict = {"status": STATUS_TEXT.get(status, str(status))}
    entry: dict = {}
    if resource is not None and "id" in resource:
        meta = resource.get("meta") or {}
        vid = meta.get("versionId")
        entry["fullUrl"] = f"{resource['resourceType']}/{resource['id']}"
        if vid:
            response["location"] = f"{resource['resourceType']}/{resource['id']}/_history/{vid}"
            response["etag"] = f'W/"{vid}"'
        if meta.get("lastUpdated"):
            response["lastModified"] = meta["lastUpdated"]
        if include_resource:
            entry["resource"] = resource
    entry["response"] = response
    return entry


def put_entry(resource: dict, if_match: str | None = None) -> dict:
    """A transaction entry that PUTs ``resource`` at its (caller-assigned) id, optionally If-Match."""
    request = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    if if_match:
        request["ifMatch"] = if_match
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource, "request": request}


def latest_version(store, resource_type: str, resource_id: str) -> int:
    """The latest version number of a resource in ``store``: 0 if it was never written; a deleted resource
    keeps counting, so a caller that PUTs it again with If-Match on this number cannot lose a write."""
    try:
        return int(store.read(resource_type, resource_id)["meta"]["versionId"])
    except NotFound:
        return 0
    except Gone:
        latest = store.history(resource_type, resource_id, count=1)
        return int(latest[0]["meta"]["versionId"]) if latest else 0
