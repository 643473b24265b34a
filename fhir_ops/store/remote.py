"""The ``Store`` contract over an external FHIR R4 server (HAPI FHIR JPA, a cloud FHIR service).

Connection settings live in a fhirpy ``SyncFHIRClient``; every remote failure is mapped to TrialTwin's
``FhirError`` types, so callers see the same errors whichever store they run on.
"""
from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests
from fhirpy import SyncFHIRClient

from fhir_ops.errors import (
    Conflict,
    FhirError,
    Gone,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    TooManyRequests,
    UnsupportedMediaType,
)
from fhir_ops.search.query import DEFAULT_COUNT
from fhir_ops.store.base import SearchResult, Store, WriteResult
from fhir_ops.store.sqlite import DELETED_TAG

FHIR_JSON = "application/fhir+json"

# Status codes a FHIR server uses for client errors, mapped to our error types; 422 is HAPI's
# answer to a resource that fails validation, which the contract calls InvalidRequest.
_ERRORS_BY_STATUS: dict[int, type[FhirError]] = {
    400: InvalidRequest,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    410: Gone,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    429: TooManyRequests,
}

# Search parameters that steer the search rather than filter it; servers echo them differently in
# the self link, so they never count as "ignored".
#: HAPI's code for a lost race between writers of one client-assigned id (the transaction was rolled back)
_ID_RACE = "HAPI-0825"
_ID_RACE_RETRIES = 3

_CONTROL_PARAMS = {"_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_total",
                   "_elements", "_format", "_pretty"}


def _version_of(if_match: str) -> str:
    """Accept a bare version id or an ETag (``W/"3"``, ``"3"``) and return the version id."""
    tag = if_match.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    return tag.strip('"')


def _diagnostics(body: Any) -> tuple[str, list[dict]]:
    """Pull a message and the issues out of a server's OperationOutcome (or say what came back)."""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = [i for i in body.get("issue", []) if isinstance(i, dict)]
        texts = [i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code", "")
                 for i in issues if i.get("severity") in ("error", "fatal")] or \
                [i.get("diagnostics", "") for i in issues]
        return "; ".join(t for t in texts if t) or "remote server reported an error", issues
    return "", []


class RemoteStore(Store):
    """A ``Store`` backed by an external FHIR R4 server.

    Parameters
    ----------
    base_url : str
        The server's FHIR base, e.g. ``http://127.0.0.1:8090/fhir``.
    headers : dict, optional
        Extra headers sent with every request (``Authorization: Bearer ...``).
    timeout : float
        Seconds to wait for each HTTP answer.

    Notes
    -----
    The fhirpy client holds the connection settings (base URL, authorization and extra headers,
    timeout) and is exposed as ``client`` for callers that want fhirpy's resource API. Requests
    themselves go through ``requests`` sessions built from those settings (one per thread: the
    server is threaded and a Session is not documented as thread-safe), because fhirpy's
    request helper folds 404 and 410 into one exception and drops the status and headers the
    contract depends on (``Gone`` versus ``NotFound``, ``created``, ``If-Match``, ``If-None-Exist``).

    Differences from the embedded store that the contract allows: ids are whatever the server
    assigns (UUIDs on TrialTwin's HAPI), an update that changes nothing may keep the old version
    (HAPI does not write no-op versions), and ``meta.source`` is added by HAPI.

    Examples
    --------
    >>> store = RemoteStore("http://127.0.0.1:8090/fhir")  # doctest: +SKIP
    >>> store.create({"resourceType": "Patient"}).created  # doctest: +SKIP
    True
    """

    name = "hapi"

    def __init__(self, base_url: str, headers: dict | None = None, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = SyncFHIRClient(self.base_url, extra_headers=dict(headers or {}),
                                     requests_config={"timeout": timeout})
        self.timeout = timeout
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    @property
    def _session(self) -> requests.Session:
        """This thread's connection pool to the remote server."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    # -- wire -----------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, params: list[tuple[str, str]] | None = None,
              body: dict | None = None, headers: dict | None = None) -> requests.Response:
        url = self.base_url + "/" + path.lstrip("/") if path else self.base_url
        all_headers = {**self.client._build_request_headers(), "Accept": FHIR_JSON}
        if body is not None:
            all_headers["Content-Type"] = FHIR_JSON
        all_headers.update(headers or {})
        for attempt in range(_ID_RACE_RETRIES + 1):
            try:
                response = self._session.request(method, url, params=params, json=body,
                                                 headers=all_headers, timeout=self.timeout)
            except requests.RequestException as exc:
                raise FhirError(f"remote FHIR server {self.base_url} unreachable: {exc}", status=503,
                                code="transient", error_id="store-unavailable") from exc
            # Two writers creating the same client-assigned id at once: HAPI rolls the loser back whole
            # and answers 409 HAPI-0825; its maintainers' remedy is to send the same request again.
            if not (response.status_code == 409 and _ID_RACE in response.text) or attempt == _ID_RACE_RETRIES:
                break
            time.sleep(0.5 * (attempt + 1))
        if response.status_code >= 400:
            raise self._error(response, method, url)
        return response

    def _error(self, response: requests.Response, method: str, url: str) -> FhirError:
        try:
            body = response.json()
        except ValueError:
            body = None
        message, issues = _diagnostics(body)
        if not message:
            message = (response.text or response.reason or "").strip()[:500]
        status = response.status_code
        if status in (401, 403):
            # The store refused TrialTwin's own credentials: a deployment problem, not the caller's
            # token, so it must not reach the client as a 401/403 about their request.
            return FhirError(f"remote FHIR server refused TrialTwin's credentials ({status}) on "
                             f"{method} {url}: {message}", status=502, code="exception",
                             error_id="store-unauthorized")
        error_type = _ERRORS_BY_STATUS.get(status)
        if error_type is None:
            # The remote server failed, not the caller: a gateway error, whatever it said.
            return FhirError(f"remote FHIR server failed ({status}) on {method} {url}: {message}",
                             status=502, code="exception", error_id="store-upstream-error")
        extra = [i for i in issues if i.get("severity") in ("error", "fatal")][1:]
        return error_type(message, status=status, extra_issues=extra)

    @staticmethod
    def _json(response: requests.Response) -> dict:
        try:
            return response.json()
        except ValueError as exc:
            raise FhirError(f"remote FHIR server sent a non-JSON answer ({response.status_code})",
                            status=502, code="exception", error_id="store-upstream-error") from exc

    @staticmethod
    def _check_type(resource: dict) -> str:
        resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
        if not isinstance(resource_type, str) or not resource_type:
            raise InvalidRequest("resource has no resourceType", expression=["resourceType"])
        return resource_type

    # -- Store ----------------------------------------------------------------------------------

    def create(self, resource: dict, *, if_none_exist: str | None = None) -> WriteResult:
        resource_type = self._check_type(resource)
        # The contract gives new resources a server-assigned id, whatever the client sent.
        body = {k: v for k, v in resource.items() if k not in ("id", "meta")}
        if "meta" in resource:
            meta = {k: v for k, v in resource["meta"].items() if k not in ("versionId", "lastUpdated")}
            if meta:
                body["meta"] = meta
        headers = {"Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        response = self._send("POST", resource_type, body=body, headers=headers)
        stored = self._json(response)
        if stored.get("resourceType") != resource_type:
            # Some servers answer a matched conditional create with an OperationOutcome only.
            stored = self._read_location(response) or stored
        return WriteResult(resource=stored, created=response.status_code == 201)

    def _read_location(self, response: requests.Response) -> dict | None:
        location = response.headers.get("Content-Location") or response.headers.get("Location")
        if not location:
            return None
        parts = urlsplit(location).path.rstrip("/").split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        return self.read(parts[-2], parts[-1])

    def read(self, resource_type: str, resource_id: str) -> dict:
        return self._json(self._send("GET", f"{resource_type}/{resource_id}"))

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> dict:
        return self._json(self._send("GET", f"{resource_type}/{resource_id}/_history/{version_id}"))

    def update(self, resource_type: str, resource_id: str, resource: dict, *,
               if_match: str | None = None) -> WriteResult:
        if self._check_type(resource) != resource_type:
            raise InvalidRequest(f"resource type {resource['resourceType']} does not match "
                                 f"the URL's {resource_type}", expression=["resourceType"])
        if resource.get("id") not in (None, resource_id):
            raise InvalidRequest(f"resource id {resource['id']} does not match the URL's "
                                 f"{resource_id}", expression=[f"{resource_type}.id"])
        body = {**resource, "id": resource_id}
        headers = {"Prefer": "return=representation"}
        if if_match:
            headers["If-Match"] = f'W/"{_version_of(if_match)}"'
        try:
            response = self._send("PUT", f"{resource_type}/{resource_id}", body=body, headers=headers)
        except Conflict as exc:
            if not if_match:
                raise
            # HAPI reports a stale If-Match as 409 (version conflict); FHIR and the contract say 412.
            raise PreconditionFailed(exc.message, extra_issues=exc.extra_issues) from exc
        return WriteResult(resource=self._json(response), created=response.status_code == 201)

    def delete(self, resource_type: str, resource_id: str) -> None:
        # Deleting an unknown or already deleted id is a successful no-op, as in the embedded store
        # (FHIR allows either); HAPI says so with 200 and SUCCESSFUL_DELETE_NOT_FOUND.
        self._send("DELETE", f"{resource_type}/{resource_id}")

    def history(self, resource_type: str | None, resource_id: str | None = None, *,
                count: int | None = None, offset: int = 0) -> list[dict]:
        # HAPI pages history with its own next links (no _offset): read pages until the window is covered.
        offset = max(0, int(offset))
        wanted = None if count is None else offset + int(count)
        page = 1000 if wanted is None else max(1, min(wanted, 1000))
        bundle = self._json(self._send("GET", self._history_path(resource_type, resource_id),
                                       params=[("_count", str(page))]))
        versions: list[dict] = []
        while True:
            for entry in bundle.get("entry", []):
                if "resource" in entry:
                    versions.append(entry["resource"])
                elif (entry.get("request") or {}).get("method") == "DELETE":
                    # A deleted version has no body; keep its place in history as a stub.
                    versions.append(self._deleted_stub(entry))
            following = next((l["url"] for l in bundle.get("link", []) if l.get("relation") == "next"), None)
            if following is None or (wanted is not None and len(versions) >= wanted):
                break
            bundle = self._json(self._get_absolute(following))
        return versions[offset:wanted]

    def history_total(self, resource_type: str | None, resource_id: str | None = None) -> int:
        bundle = self._json(self._send("GET", self._history_path(resource_type, resource_id),
                                       params=[("_count", "1")]))
        if isinstance(bundle.get("total"), int):
            return bundle["total"]
        return len(self.history(resource_type, resource_id))  # a server that does not count: count here

    @staticmethod
    def _history_path(resource_type: str | None, resource_id: str | None) -> str:
        if resource_type is None:
            return "_history"
        return f"{resource_type}/{resource_id}/_history" if resource_id else f"{resource_type}/_history"

    def _get_absolute(self, url: str) -> requests.Response:
        """GET a paging link the server gave (absolute; it must be on this server's base)."""
        if not url.startswith(self.base_url + "/") and url != self.base_url and not url.startswith(self.base_url + "?"):
            raise FhirError(f"remote FHIR server {self.base_url} returned a paging link to another place: {url}",
                            status=502, code="exception", error_id="store-bad-link")
        path, _, query = url[len(self.base_url):].partition("?")
        return self._send("GET", path.strip("/"), params=parse_qsl(query, keep_blank_values=True))

    @staticmethod
    def _deleted_stub(entry: dict) -> dict:
        """The embedded store's stand-in for a deleted version: type, id, version, DELETED_TAG."""
        request_url = (entry.get("request") or {}).get("url", "")
        parts = urlsplit(request_url or entry.get("fullUrl", "")).path.strip("/").split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        response = entry.get("response") or {}
        meta: dict = {"tag": [dict(DELETED_TAG)]}
        if response.get("etag"):
            meta["versionId"] = _version_of(response["etag"])
        if response.get("lastModified"):
            meta["lastUpdated"] = response["lastModified"]
        return {"resourceType": parts[-2], "id": parts[-1], "meta": meta}

    def search(self, resource_type: str, params: list[tuple[str, str]], *,
               strict: bool = False) -> SearchResult:
        params = list(params)
        headers = {"Prefer": "handling=strict" if strict else "handling=lenient"}
        summary_count = ("_summary", "count") in params
        response = self._send("GET", resource_type, params=params, headers=headers)
        bundle = self._json(response)
        matches, included = [], []
        for entry in bundle.get("entry", []):
            resource = entry.get("resource")
            if resource is None:
                continue
            mode = (entry.get("search") or {}).get("mode", "match")
            if mode == "include":
                included.append(resource)
            elif mode == "match":
                matches.append(resource)
            # mode "outcome" (server warnings about the search) is not a resource the caller asked for
        offset = next((int(v) for k, v in params if k == "_offset" and v.isdigit()), 0)
        # The page size the embedded store would report; TrialTwin's HAPI uses the same default (50).
        count = next((int(v) for k, v in params if k == "_count" and v.isdigit()), DEFAULT_COUNT)
        return SearchResult(
            total=bundle.get("total"),
            matches=[] if summary_count else matches,
            included=included,
            offset=offset,
            count=count,
            ignored=[] if strict else self._ignored(bundle, params),
        )

    @staticmethod
    def _ignored(bundle: dict, params: list[tuple[str, str]]) -> list[str]:
        """Parameters the server dropped: those it did not echo in the Bundle's self link."""
        self_link = next((l.get("url") for l in bundle.get("link", []) if l.get("relation") == "self"), None)
        if not self_link:
            return []
        echoed = {name.split(":")[0] for name, _ in parse_qsl(urlsplit(self_link).query)}
        ignored = []
        for name, _ in params:
            base = name.split(":")[0].split(".")[0]
            if base not in _CONTROL_PARAMS and base not in echoed and name not in ignored:
                ignored.append(name)
        return ignored

    def transaction(self, bundle: dict) -> dict:
        return self._bundle(bundle, "transaction")

    def batch(self, bundle: dict) -> dict:
        return self._bundle(bundle, "batch")

    def _bundle(self, bundle: dict, kind: str) -> dict:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise InvalidRequest(f"a {kind} must be a Bundle", expression=["Bundle"])
        if bundle.get("type") != kind:
            raise InvalidRequest(f"Bundle.type must be '{kind}', not {bundle.get('type')!r}",
                                 expression=["Bundle.type"])
        response = self._send("POST", "", body=bundle, headers={"Prefer": "return=representation"})
        return self._json(response)

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def metadata(self) -> dict:
        """Return the server's CapabilityStatement (used to report the server's software version)."""
        return self._json(self._send("GET", "metadata"))
