"""Store-independent pieces of FHIR transaction/batch processing: entry parsing, ordering, references.

Kept apart from the SQLite store so the rules (FHIR R4 3.1.0.11.2) are read in one place.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from urllib.parse import parse_qsl

from fhir_ops.errors import InvalidRequest
from fhir_ops.validation import is_resource_type

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

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"


def _relative(url: str) -> tuple[list[str], str | None]:
    path, _, query = url.partition("?")
    segments = [s for s in path.split("/") if s]
    if "://" in url:  # absolute: keep what follows the server base
        for i, seg in enumerate(segments):
            if is_resource_type(seg):
                segments = segments[i:]
                break
    return segments, (query if "?" in url else None)


def parse_entries(bundle: dict, expected_type: str) -> list[EntryRequest]:
    """Check a transaction/batch Bundle's shape and parse every entry's request.

    Raises ``InvalidRequest`` naming the entry (``Bundle.entry[3].request``) for a malformed one.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidRequest("expected a Bundle resource", error_id="invalid-bundle", expression=["Bundle"])
    if bundle.get("type") != expected_type:
        raise InvalidRequest(f"expected Bundle.type {expected_type!r}, got {bundle.get('type')!r}",
                             error_id="invalid-bundle", expression=["Bundle.type"])
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise InvalidRequest("Bundle.entry must be a list", error_id="invalid-bundle", expression=["Bundle.entry"])
    parsed = []
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{where} must be an object", error_id="invalid-bundle", expression=[where])
        req = entry.get("request")
        if not isinstance(req, dict) or not isinstance(req.get("url"), str) or req.get("method") not in METHOD_ORDER:
            raise InvalidRequest(f"{where}.request needs a method (GET, POST, PUT, DELETE) and a url",
                                 error_id="invalid-bundle", expression=[f"{where}.request"])
        method = req["method"]
        if method == "PATCH":
            raise InvalidRequest(f"{where}: PATCH is not supported", error_id="not-supported", code="not-supported",
                                 expression=[f"{where}.request.method"])
        segments, query = _relative(req["url"])
        if not segments or not is_resource_type(segments[0]):
            raise InvalidRequest(f"{where}.request.url {req['url']!r} does not start with a resource type",
                                 error_id="invalid-bundle", expression=[f"{where}.request.url"])
        rtype = segments[0]
        rid = segments[1] if len(segments) >= 2 else None
        vid = segments[3] if len(segments) == 4 and segments[2] == "_history" else None
        if len(segments) > 2 and vid is None or len(segments) > 4:
            raise InvalidRequest(f"{where}.request.url {req['url']!r} is not a supported interaction",
                                 error_id="invalid-bundle", expression=[f"{where}.request.url"])
        resource = entry.get("resource")
        if method in ("POST", "PUT"):
            if not isinstance(resource, dict):
                raise InvalidRequest(f"{where}: a {method} entry needs a resource", error_id="invalid-bundle",
                                     expression=[f"{where}.resource"])
            if resource.get("resourceType") != rtype:
                raise InvalidRequest(f"{where}: resource type {resource.get('resourceType')!r} does not match "
                                     f"request url type {rtype!r}", error_id="type-mismatch",
                                     expression=[f"{where}.resource.resourceType"])
            if method == "PUT" and (rid is None or query is not None):
                raise InvalidRequest(f"{where}: PUT needs a url Type/id (conditional update is not supported)",
                                     error_id="not-supported", expression=[f"{where}.request.url"])
            if method == "POST" and rid is not None:
                raise InvalidRequest(f"{where}: POST url must be the resource type only",
                                     error_id="invalid-bundle", expression=[f"{where}.request.url"])
        if method == "DELETE" and rid is None:
            raise InvalidRequest(f"{where}: DELETE needs a url Type/id (conditional delete is not supported)",
                                 error_id="not-supported", expression=[f"{where}.request.url"])
        parsed.append(EntryRequest(
            index=i, method=method, resource_type=rtype, resource_id=rid, version_id=vid,
            query=parse_qsl(query, keep_blank_values=True) if query is not None else None,
            resource=resource if isinstance(resource, dict) else None,
            full_url=entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None,
            if_match=req.get("ifMatch"), if_none_exist=req.get("ifNoneExist")))
    return parsed


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
