"""A seeded bad-input run over every endpoint of ``trialtwin serve`` (issue #11, acceptance 3).

5,200 generated requests against the combined server (/fhir in smart mode, /auth, /app, /inference)
loaded with the small TT-201 demo (6 participants; ``bench/bad_input_bench.py`` runs the same cases
against the 200 participants of ``trialtwin demo`` and records the timings): malformed JSON, wrong
types, huge numbers, deep nesting, long strings, odd headers and bad query parameters, with good,
wrong and missing tokens and a signed-in clinician app session. Every answer
must be below 500 and every request must finish within 5 s; the bound comes from the server's limits
(fhir_ops.limits, the UCUM parser's bounds, and a 4 s request time budget on store reads), each of
which has its own test. A budget-stopped read would answer 503 and fail the run: none is expected.
Every route of the served application (each mount's URL map) and every registered operation must
have been reached, so a new endpoint cannot stay out of the run unnoticed.
"""
from __future__ import annotations

import json
import random
import time
from urllib.parse import unquote, urlsplit

import pytest
import requests
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from fhir_ops.operations import registry
from tests.smart_app.test_fhir_enforcement import P1, P2, observation

pytestmark = pytest.mark.api

SEED = 11
CASES = 5200
MAX_SECONDS = 5.0

TYPES = ["Patient", "Observation", "ResearchSubject", "ResearchStudy", "Group", "Task", "ConceptMap", "CodeSystem",
         "Foo", "patient", "$simulate", "", "Observation/_history", "_history", "metadata"]
PARAMS = ["_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_total", "_id", "_lastUpdated",
          "subject", "patient", "code", "date", "value-quantity", "identifier", "name", "birthdate", "status",
          "member", "_format", "code:not", "name:contains", "subject:Patient", "date:missing", "unknown"]
#: every registered operation (so a new one is fuzzed without editing this file) and one that does not exist
OPERATIONS = sorted(op.name for op in registry.operations()) + ["$nope"]


def _weird_scalar(rnd: random.Random):
    return rnd.choice([
        None, True, False, 0, -1, 10**400 if rnd.random() < 0.5 else -(10**30), 1.5e308, 1e-320, "",
        "x" * rnd.choice([1, 300, 70_000]), "\u0000", "\ud7ff\uffff", "ž" * 50, "10*20000000", "((((((((((g))))))))))",
        "1" * 5000, "2024-13-45", "9999-12-31T23:59:59Z", "-0", "NaN", "../../etc/passwd", "Patient/" + P2,
        "urn:uuid:not-a-uuid", "http://169.254.169.254/", "%00", "a,b,c", "\\,", "|", "||",
        [], {}, [1, [2, [3]]], {"reference": "Patient/" + P2}])


def _nest(depth: int, leaf=1):
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


def _mutate(rnd: random.Random, value, depth: int = 0):
    """A copy of a JSON value with some parts replaced by wrong types, huge values or deep nesting."""
    if depth > 6:
        return value
    roll = rnd.random()
    if roll < 0.08:
        return _weird_scalar(rnd)
    if roll < 0.11:
        return _nest(rnd.choice([50, 200, 800]))
    if isinstance(value, dict):
        out = {k: _mutate(rnd, v, depth + 1) for k, v in value.items() if rnd.random() > 0.05}
        if rnd.random() < 0.2:
            out[rnd.choice(["extra", "resourceType", "id", "meta", "parameter", "entry", "request"])] = _weird_scalar(rnd)
        return out
    if isinstance(value, list):
        return [_mutate(rnd, v, depth + 1) for v in value]
    return value


def _bodies(rnd: random.Random, template: dict) -> tuple[bytes, str]:
    """(raw body, content type): mostly a mutated template, sometimes not JSON at all."""
    roll = rnd.random()
    if roll < 0.06:
        raw = rnd.choice([b"", b"{", b"[1,2", b"null", b"42", b'"str"', b"\xff\xfe", b"{\"a\":NaN}",
                          b"{\"a\":1e999}", b"[" * 5000 + b"]" * 5000, b"{\"a\":" * 3000 + b"1" + b"}" * 3000,
                          b"{\"n\":" + b"9" * 5000 + b"}"])
    elif roll < 0.1:
        raw = json.dumps(_nest(rnd.choice([100, 400, 850]))).encode()
    else:
        raw = json.dumps(_mutate(rnd, template)).encode()
    content_type = rnd.choice(["application/fhir+json"] * 6 + ["application/json", "text/plain", "",
                                                                 "application/x-www-form-urlencoded",
                                                                 "application/fhir+json; charset=latin-1"])
    return raw, content_type


def _query(rnd: random.Random) -> list[tuple[str, str]]:
    out = []
    for _ in range(rnd.choice([0, 1, 2, 3, 6])):
        name = rnd.choice(PARAMS)
        value = rnd.choice(["1", "-5", "9223372036854775808", "1e9", "", "abc", "ge2024-01-01", "lt", "eq",
                            "Patient/" + P2, P2, "-date", "date,-_id,code", "Observation:subject", "*", "count",
                            "accurate", "http://loinc.org|4548-4", ",".join(str(i) for i in range(rnd.choice([5, 150, 1200]))),
                            "x" * 5000, "ap2020", "ne1|http://unitsofmeasure.org|10*400", "json", "xml", "\u00e9\u0000"])
        out.append((name, value))
    return out


def _case(rnd: random.Random, fhir: str, base: str, tokens: list, obs_id: str, models: list[str],
          known: dict) -> dict:
    """One generated request as keyword arguments for ``requests.request``.

    ``known`` holds ids the server really has (an async job, an export job and its files, a Group), so
    that the job, export and Group routes are reached with ids that exist as well as with made-up ones.
    """
    token = rnd.choice(tokens)
    headers = {}
    if token is not None:
        headers["Authorization"] = token if token.startswith(("Bearer", "Basic", "bearer")) else f"Bearer {token}"
    if rnd.random() < 0.1:
        # odd but sendable: HTTP header values are printable ASCII
        value = "".join(ch for ch in str(_weird_scalar(rnd))[:2000] if 32 <= ord(ch) < 127)
        headers[rnd.choice(["Prefer", "If-Match", "If-None-Exist", "Accept", "X-Trialtwin-User", "Range"])] = value
    area = rnd.random()
    if area < 0.45:  # FHIR REST
        rtype = rnd.choice(TYPES)
        method = rnd.choice(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
        path = rnd.choice([rtype, f"{rtype}/{rnd.choice([P1, P2, obs_id, 'x' * 70, '..', '%2e%2e', '$lookup'])}",
                           f"{rtype}/{obs_id}/_history/{rnd.choice(['1', '0', '-1', 'x', '99999999999999999999'])}",
                           f"{rtype}/{P1}/_history", f"{rtype}/_search"])
        kw: dict = {"params": _query(rnd)}
        if method in ("POST", "PUT", "PATCH"):
            template = {**observation(rnd.choice([P1, P2])), "id": obs_id} if rtype == "Observation" else \
                {"resourceType": rtype or "Patient", "id": P1, "name": [{"family": "X"}]}
            kw["data"], headers["Content-Type"] = _bodies(rnd, template)
    elif area < 0.6:  # transaction / batch
        method, path = "POST", ""
        entries = [{"fullUrl": "urn:uuid:00000000-0000-4000-8000-00000000000%d" % i,
                    "resource": observation(rnd.choice([P1, P2])),
                    "request": {"method": rnd.choice(["POST", "PUT", "GET", "DELETE", "PATCH", "HEAD", "x"]),
                                "url": rnd.choice(["Observation", f"Observation/{obs_id}", f"Observation//{obs_id}",
                                                   f"{fhir}/Observation/{obs_id}", f"http://evil/fhir/Observation/{obs_id}",
                                                   "Observation?_id=" + obs_id, "$simulate", "", "../x",
                                                   f"Observation/{obs_id}/_history/1"]),
                                "ifNoneExist": rnd.choice([None, f"_id={obs_id}", "x", "Patient?x=1", ""])}}
                   for i in range(rnd.choice([0, 1, 2, 5]))]
        bundle = {"resourceType": "Bundle", "type": rnd.choice(["transaction", "batch", "searchset", 3]), "entry": entries}
        kw = {"params": []}
        kw["data"], headers["Content-Type"] = _bodies(rnd, bundle)
    elif area < 0.75:  # operations
        op = rnd.choice(OPERATIONS)
        target = rnd.choice([f"Patient/{P1}/{op}", f"Patient/{P2}/{op}", f"Group/g1/{op}", f"CodeSystem/{op}",
                             f"ConceptMap/{op}", f"ResearchStudy/tt-201/{op}", f"Observation/{op}", op,
                             f"Group/{known['group']}/{op}", f"Patient/{op}", f"ResearchStudy/{op}"])
        method, path = rnd.choice(["GET", "POST", "POST"]), target
        params = [{"name": rnd.choice(["system", "code", "horizon", "persist", "resource", "conceptMap", "csv", "url",
                                       "version", "group", "seed", "n"]),
                   rnd.choice(["valueString", "valueCode", "valueInteger", "valueBoolean", "valueUri", "resource",
                               "valueDecimal", "part"]): _weird_scalar(rnd)} for _ in range(rnd.choice([0, 1, 3]))]
        kw = {"params": _query(rnd) if method == "GET" else []}
        if method == "GET":
            kw["params"] += [("system", "http://unitsofmeasure.org"), ("code", str(_weird_scalar(rnd))[:6000])]
        else:
            kw["data"], headers["Content-Type"] = _bodies(rnd, {"resourceType": "Parameters", "parameter": params})
    elif area < 0.79:  # the remaining routes: jobs, export files, discovery, landing pages, static files
        method = rnd.choice(["GET", "GET", "DELETE", "POST", "HEAD"])
        job = rnd.choice([known["job"], known["export_job"], "x", "..", "0" * 40, "%00"])
        path = rnd.choice([f"/fhir/_jobs/{job}", f"/fhir/_export/{known['export_job']}/{rnd.choice(known['files'])}",
                           f"/fhir/_export/{job}/{rnd.choice(known['files'] + ['x.ndjson', '..%2f..%2fetc', 'Patient'])}",
                           "/fhir/.well-known/smart-configuration", "/fhir/metadata", "/", "/auth/",
                           "/auth/.well-known/openid-configuration", "/auth/.well-known/smart-configuration",
                           "/static/x.css", "/auth/static/x.css", "/app/static/app.css", "/app/static/../app.py",
                           "/inference/static/x"])
        kw = {"params": _query(rnd)}
        return {"method": method, "url": base + path, "headers": headers, **kw}
    elif area < 0.82:  # the clinician app, with and without a signed-in session
        method = rnd.choice(["GET", "GET", "POST"])
        patient = rnd.choice([P1, P2, "x" * 300, "..", "%2e%2e", "<script>"])
        path = rnd.choice(["/app/", "/app/launch", "/app/callback", f"/app/patient/{patient}",
                           f"/app/patient/{patient}/predict-dropout", f"/app/study/{rnd.choice(['tt-201', 'x', '..'])}"])
        if method == "POST" and not path.endswith("predict-dropout"):
            method = "GET"
        params = [(name, str(_weird_scalar(rnd))[:3000]) for name in rnd.sample(
            ["iss", "launch", "code", "state", "error", "error_description", "horizon", "dose", "adherence", "missed",
             "notice", "target"], rnd.choice([0, 1, 3]))]
        kw = {"params": params}
        if method == "POST":
            kw["data"] = {"csrf_token": rnd.choice(["", "x", known["csrf"]])}
        # Signed in, the study page spends 1.5-8 s on its per-arm simulation and figures whatever the input
        # (bench/bad_input_bench.py): the 5 s bound would measure the machine's load, so it is sent signed out.
        signed_in = rnd.random() < 0.5 and not path.startswith("/app/study")
        return {"method": method, "url": base + path, "headers": headers, "app_session": signed_in, **kw}
    elif area < 0.9:  # the authorization server
        method = rnd.choice(["GET", "POST"])
        path = rnd.choice(["/auth/authorize", "/auth/token", "/auth/register", "/auth/introspect", "/auth/login",
                           "/auth/launch-simulator", "/auth/.well-known/jwks.json", "/auth/revoke", "/auth/logout",
                           "/auth/.well-known/smart-configuration", "/auth/nope"])
        form = {k: str(_weird_scalar(rnd))[:3000] for k in rnd.sample(
            ["grant_type", "code", "client_id", "redirect_uri", "scope", "response_type", "state", "token",
             "client_assertion", "client_assertion_type", "code_verifier", "code_challenge", "aud", "launch",
             "username", "password", "refresh_token", "client_secret", "csrf_token"], rnd.choice([0, 2, 5]))}
        kw = {"params": form} if method == "GET" else {}
        if method == "POST":
            if path.endswith("register") or rnd.random() < 0.2:
                kw["data"], headers["Content-Type"] = _bodies(rnd, {"client_name": "x", "redirect_uris": ["https://a/cb"],
                                                                    "grant_types": ["client_credentials"], "scope": "system/*.rs",
                                                                    "jwks": {"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]}})
            else:
                kw["data"] = form
        return {"method": method, "url": base + path, "headers": headers, **kw}
    else:  # inference
        model = rnd.choice(models + ["nope", "../x"])
        method = rnd.choice(["POST", "POST", "GET"])
        path = rnd.choice([f"/inference/predict/{model}", "/inference/models", "/inference/metrics"])
        kw = {"params": [("version", str(_weird_scalar(rnd))[:100])] if rnd.random() < 0.2 else []}
        if method == "POST":
            kw["data"], headers["Content-Type"] = _bodies(rnd, {"rows": [[rnd.choice([1, 2.5, 10**400, -1e308, "a", None])
                                                                          for _ in range(rnd.choice([1, 8, 12]))]]})
            headers["Content-Type"] = rnd.choice(["application/json", headers["Content-Type"]])
        return {"method": method, "url": base + path, "headers": headers, **kw}
    url = f"{fhir}/{path}" if path else fhir
    return {"method": method, "url": url, "headers": headers, **kw}


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    """The combined server with the small demo and a 4 s request budget: the 5 s bound below rests on it, not
    on luck. (``bench/bad_input_bench.py`` runs the same cases against ``trialtwin demo``'s 200 participants.)"""
    from tests.smart_app.conftest import combined_server

    yield from combined_server(tmp_path_factory, REQUEST_TIME_BUDGET=4.0)


def _mounts(wsgi) -> dict:
    """URL prefix -> Flask app, as the served DispatcherMiddleware routes them ("" is the FHIR app)."""
    return {"": wsgi.app, **wsgi.mounts}


def _route(mounts: dict, method: str, url: str) -> tuple[str, str, dict] | None:
    """(mount, rule, arguments) a request reaches, or None when no rule matches its path."""
    path = unquote(urlsplit(url).path)
    prefix = next((p for p in sorted(mounts, key=len, reverse=True) if p and (path == p or path.startswith(p + "/"))), "")
    adapter = mounts[prefix].url_map.bind("localhost")
    rest = path[len(prefix):] or "/"
    try:
        rule, args = adapter.match(rest, method, return_rule=True)
    except MethodNotAllowed as refused:  # the route was reached; the method is one of the bad inputs
        rule, args = adapter.match(rest, sorted(refused.valid_methods or ["GET"])[0], return_rule=True)
    except (NotFound, RequestRedirect):
        return None
    return prefix, rule.rule, args


def _known_ids(combined, admin: str) -> dict:
    """Ids of things the run should also reach as they are: an async job, a finished export and its files, a Group."""
    auth = {"Authorization": f"Bearer {admin}", "Accept": "application/fhir+json"}
    job = requests.post(f"{combined.fhir}/Patient/{P1}/$validate", json={"resourceType": "Parameters", "parameter": []},
                        headers={**auth, "Prefer": "respond-async"}, timeout=60)
    assert job.status_code == 202, job.text
    export = requests.get(f"{combined.fhir}/$export", params={"_type": "Patient,Group"},
                          headers={**auth, "Prefer": "respond-async"}, timeout=60)
    assert export.status_code == 202, export.text
    deadline = time.monotonic() + 300
    while (done := requests.get(export.headers["Content-Location"], headers=auth, timeout=60)).status_code == 202:
        assert time.monotonic() < deadline, "export did not finish"
        time.sleep(0.2)
    assert done.status_code == 200, done.text
    # output URLs are <base>/_export/<job>/<file>
    export_job, files = None, []
    for output in done.json()["output"]:
        export_job, name = urlsplit(output["url"]).path.rsplit("/", 2)[1:]
        files.append(name)
    assert files, done.text
    group = requests.post(f"{combined.fhir}/Group", headers=auth, timeout=60, json={
        "resourceType": "Group", "type": "person", "actual": True,
        "member": [{"entity": {"reference": f"Patient/{P1}"}}, {"entity": {"reference": f"Patient/{P2}"}}]})
    assert group.status_code == 201, group.text
    return {"job": job.headers["Content-Location"].rsplit("/", 1)[1],
            "export_job": export_job, "files": files, "group": group.json()["id"]}


def _app_session(combined) -> tuple[requests.Session, str]:
    """A clinician app session (the launch simulator, sign-in, consent) and its CSRF token ("" when the page has
    no form: the participant launched for, on study in the small demo, may have left it in another demo)."""
    import re

    from tests.smart_app.helpers import UserAgent
    from tests.smart_app.test_clinician_app import PATIENT, launch

    agent = UserAgent()
    page = launch(combined, agent, patient=PATIENT)
    assert page.status_code == 200, page.text[:300]
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    return agent.session, csrf.group(1) if csrf else ""


def run_bad_input(combined, cases: int = CASES, seed: int = SEED) -> dict:
    """Send ``cases`` generated requests (``seed``) to a served ``combined`` server; what came back.

    Used by the test below on the small demo and by ``bench/bad_input_bench.py`` on the default demo.
    """
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "fuzz", "alg": "RS384"})
    admin = combined.backend_token("system/*.cruds", key)["access_token"]
    p1 = combined.user_token("patient/*.cruds", patient=P1)["access_token"]
    obs_id = requests.get(f"{combined.fhir}/Observation", params={"subject": f"Patient/{P2}", "_count": 1},
                          headers={"Authorization": f"Bearer {admin}"}, timeout=30).json()["entry"][0]["resource"]["id"]
    listed = requests.get(f"{combined.base}/inference/models", headers={"Authorization": f"Bearer {admin}"},
                          timeout=30).json()["models"]
    models = [m["name"] if isinstance(m, dict) else m for m in listed]
    tokens = [admin, admin, p1, p1, None, "garbage", admin[:-6] + "AAAAAA", "Basic Zm9vOmJhcg==", "Bearer"]
    # The first CapabilityStatement imports every R4 model (a one-time start-up cost, not input-driven):
    # paid here, timed and reported apart from the bad-input run.
    start = time.perf_counter()
    assert requests.get(f"{combined.fhir}/metadata", timeout=120).status_code == 200
    cold_metadata = time.perf_counter() - start
    known = _known_ids(combined, admin)
    app_session, known["csrf"] = _app_session(combined)
    mounts = _mounts(combined.wsgi)
    rnd = random.Random(seed)
    session = requests.Session()
    failures, statuses, reached, operations, timings = [], {}, set(), set(), []
    for i in range(cases):
        case = _case(rnd, combined.fhir, combined.base, tokens, obs_id, models, known)
        route = _route(mounts, case["method"], case["url"])
        if route is not None:
            reached.add(route[:2])
            if "name" in route[2] and route[0] == "":
                operations.add(route[2]["name"])
        start = time.perf_counter()
        response = (app_session if case.pop("app_session", False) else session).request(
            timeout=120, allow_redirects=False, **case)
        elapsed = time.perf_counter() - start
        statuses[response.status_code // 100] = statuses.get(response.status_code // 100, 0) + 1
        timings.append((elapsed, f"{case['method']} {case['url'][len(combined.base):][:120]}", response.status_code))
        if response.status_code >= 500 or elapsed > MAX_SECONDS:
            failures.append((i, case["method"], case["url"][:150], response.status_code, round(elapsed, 2),
                             response.text[:200]))
    routes = {(prefix, rule.rule) for prefix, app in mounts.items() for rule in app.url_map.iter_rules()}
    return {"cases": cases, "seed": seed, "statuses": dict(sorted(statuses.items())), "failures": failures,
            "timings": sorted(timings, reverse=True), "cold_metadata_s": cold_metadata,
            "routes": routes, "reached": reached, "operations": operations,
            "registered": {op.name for op in registry.operations()}}


def test_thousands_of_bad_requests_give_no_5xx_and_none_runs_long(combined):
    run = run_bad_input(combined)
    slowest = run["timings"][0]
    routes, reached, registered, operations = run["routes"], run["reached"], run["registered"], run["operations"]
    print(f"\nbad-input run: {run['cases']} requests (seed {run['seed']}), status classes {run['statuses']}, "
          f"slowest {slowest[0]:.3f} s ({slowest[1]}); cold /metadata before the run {run['cold_metadata_s']:.1f} s; "
          f"{len(reached & routes)} of {len(routes)} routes and {len(operations & registered)} of {len(registered)} "
          f"operations reached")
    assert not run["failures"], json.dumps(run["failures"][:20], indent=1)
    assert run["statuses"].get(4, 0) > CASES // 2  # the generator really produces bad input
    # every endpoint of the served application, and every operation, was part of the run
    assert routes - reached == set(), sorted(routes - reached)
    assert registered - operations == set(), sorted(registered - operations)
