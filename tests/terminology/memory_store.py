"""A small in-memory ``Store`` used to exercise the workflow until the embedded SQLite store lands.

It honours the parts of the ``fhir_ops.store.Store`` contract the terminology workflow relies on:
server ids, versionIds, ``If-Match``, atomic transactions with ``urn:uuid`` references, paging
and token search on ``code`` / ``event`` / ``url`` / ``status`` / ``version``.
"""
from __future__ import annotations

import copy
import datetime as dt
import itertools

from fhir_ops.errors import Gone, InvalidRequest, NotFound, PreconditionFailed
from fhir_ops.store.base import SearchResult, Store, WriteResult

_TOKEN_PATHS = {"code": "code", "event": "event"}


class MemoryStore(Store):
    name = "memory"

    def __init__(self) -> None:
        self._current: dict[tuple[str, str], dict | None] = {}
        self._history: dict[tuple[str, str], list[dict]] = {}
        self._ids = itertools.count(1)
        self.fail_next_transaction = False

    def _write(self, rtype: str, rid: str, resource: dict) -> dict:
        versions = self._history.setdefault((rtype, rid), [])
        body = copy.deepcopy(resource)
        body["resourceType"], body["id"] = rtype, rid
        body["meta"] = dict(body.get("meta", {}), versionId=str(len(versions) + 1),
                            lastUpdated=dt.datetime.now(dt.timezone.utc).isoformat())
        versions.append(body)
        self._current[(rtype, rid)] = body
        return copy.deepcopy(body)

    def create(self, resource, *, if_none_exist=None):
        return WriteResult(self._write(resource["resourceType"], str(next(self._ids)), resource), True)

    def read(self, resource_type, resource_id):
        key = (resource_type, resource_id)
        if key not in self._current:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        if self._current[key] is None:
            raise Gone(f"{resource_type}/{resource_id} was deleted")
        return copy.deepcopy(self._current[key])

    def vread(self, resource_type, resource_id, version_id):
        for body in self._history.get((resource_type, resource_id), []):
            if body["meta"]["versionId"] == version_id:
                return copy.deepcopy(body)
        raise NotFound(f"{resource_type}/{resource_id}/_history/{version_id} is not known")

    def update(self, resource_type, resource_id, resource, *, if_match=None):
        current = self._current.get((resource_type, resource_id))
        if if_match is not None:
            wanted = if_match.replace('W/"', "").strip('"')
            if current is None or current["meta"]["versionId"] != wanted:
                raise PreconditionFailed(f"{resource_type}/{resource_id} is not at version {wanted}")
        return WriteResult(self._write(resource_type, resource_id, resource), current is None)

    def delete(self, resource_type, resource_id):
        self.read(resource_type, resource_id)
        self._current[(resource_type, resource_id)] = None

    def history(self, resource_type, resource_id=None, *, count=None):
        rows = [b for (t, i), bs in self._history.items() if t == resource_type and resource_id in (None, i) for b in bs]
        return [copy.deepcopy(b) for b in reversed(rows)][:count]

    def search(self, resource_type, params, *, strict=False):
        rows = [b for (t, _), b in self._current.items() if t == resource_type and b is not None]
        count, offset, ignored = 50, 0, []
        for name, value in params:
            if name == "_count":
                count = int(value)
            elif name == "_offset":
                offset = int(value)
            elif name in ("url", "status", "version", "_id"):
                key = "id" if name == "_id" else name
                rows = [b for b in rows if b.get(key) == value]
            elif name in _TOKEN_PATHS:
                system, _, code = value.rpartition("|")
                rows = [b for b in rows if any(c.get("code") == code and (not system or c.get("system") == system)
                                               for c in (b.get(_TOKEN_PATHS[name]) or {}).get("coding", []))]
            elif strict:
                raise InvalidRequest(f"unknown search parameter {name}")
            else:
                ignored.append(name)
        rows.sort(key=lambda b: int(b["id"]))
        return SearchResult(total=len(rows), matches=[copy.deepcopy(b) for b in rows[offset:offset + count]],
                            offset=offset, count=count, ignored=ignored)

    def transaction(self, bundle):
        snapshot = (copy.deepcopy(self._current), copy.deepcopy(self._history))
        try:
            if self.fail_next_transaction:
                self.fail_next_transaction = False
                raise InvalidRequest("simulated storage failure inside the transaction")
            ids, out = {}, []
            for entry in bundle.get("entry", []):
                req, res = entry["request"], entry.get("resource")
                if req["method"] == "POST":
                    res = _rewrite(res, ids)
                    written = self.create(res).resource
                    if entry.get("fullUrl"):
                        ids[entry["fullUrl"]] = f"{written['resourceType']}/{written['id']}"
                else:
                    rtype, rid = req["url"].split("/")
                    written = self.update(rtype, rid, _rewrite(res, ids), if_match=req.get("ifMatch")).resource
                out.append({"response": {"status": "201 Created" if req["method"] == "POST" else "200 OK",
                                         "location": f"{written['resourceType']}/{written['id']}/_history/{written['meta']['versionId']}"}})
            return {"resourceType": "Bundle", "type": "transaction-response", "entry": out}
        except Exception:
            self._current, self._history = snapshot
            raise

    def batch(self, bundle):
        raise NotImplementedError("not needed by the terminology workflow")


def _rewrite(resource, ids):
    import json

    text = json.dumps(resource)
    for urn, ref in ids.items():
        text = text.replace(f'"{urn}"', f'"{ref}"')
    return json.loads(text)
