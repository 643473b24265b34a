"""The compartment matrix as an attacker runs it (issue #11, acceptance 2).

A token of Patient/tt201-p001 (``patient/*.cruds``) tries every path into another participant's data:
read, vread, search, _include/_revinclude, _history (instance/type/system), batch and transaction
(relative, absolute, malformed URLs), conditional create/update/delete, every registered operation at
every level it is declared for, async job URLs, bulk export files, Groups, counts, and the clinician
app's pages. Every answer is scanned for the other patient's resource ids and identifying details
(taken from the store itself: every version of every resource in that patient's compartment, of any
type); every count aimed at the other patient must be zero; the other patient's compartment is
snapshotted before and after and must be unchanged.
"""
from __future__ import annotations

import json
import re
import time

import pytest
import requests

from fhir_ops.auth import compartment_patients
from fhir_ops.operations import registry
from tests.smart_app.conftest import combined_server
from tests.smart_app.test_fhir_enforcement import FHIR_JSON, P1, P2, call, observation

pytestmark = pytest.mark.api

#: resource types of the demo that sit in a participant's compartment, with the parameter naming the patient
COMPARTMENT_SEARCHES = {"Observation": "subject", "ResearchSubject": "individual", "MedicationAdministration": "patient",
                        "Appointment": "patient", "Encounter": "patient", "AdverseEvent": "subject",
                        "RiskAssessment": "patient", "Task": "patient", "CarePlan": "patient", "Provenance": "patient"}


@pytest.fixture(scope="module")
def admin(combined):
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "probe-admin", "alg": "RS384"})
    return combined.backend_token("system/*.cruds", key)["access_token"]


def _compartment(combined, admin, patient: str) -> dict[tuple[str, str], str]:
    """(type, id) -> versionId of everything in ``patient``'s compartment, read with a system token.

    Kept as the cross-check of :func:`_stored_compartment` through the API the probe attacks.
    """
    out = {("Patient", patient): call("GET", f"{combined.fhir}/Patient/{patient}", admin).json()["meta"]["versionId"]}
    for rtype, param in COMPARTMENT_SEARCHES.items():
        bundle = call("GET", f"{combined.fhir}/{rtype}", admin, params={param: f"Patient/{patient}", "_count": 1000})
        assert bundle.status_code == 200, bundle.text
        for e in bundle.json().get("entry", []):
            assert e["search"]["mode"] == "match", (rtype, param, e)
            out[(rtype, e["resource"]["id"])] = e["resource"]["meta"]["versionId"]
    return out


def _stored_compartment(store, patient: str) -> dict[tuple[str, str], str]:
    """(type, id) -> newest versionId of every resource, of any type, one of whose versions was ever in
    ``patient``'s compartment: read from the server's store, not through the API under test.

    AuditEvents are left out: the server writes them about every request, the probe's refused ones too.
    """
    newest: dict[tuple[str, str], str] = {}
    ever: set[tuple[str, str]] = set()
    for version in store.history(None):  # newest first
        key = (version["resourceType"], version["id"])
        newest.setdefault(key, version["meta"]["versionId"])
        if patient in compartment_patients(version):
            ever.add(key)
    return {key: newest[key] for key in ever if key[0] != "AuditEvent"}


def _secrets(store, attacker: str, victim: str) -> set[str]:
    """Strings that only the victim's data contains: the id of every version of every resource in the
    victim's compartment and not in the attacker's (AuditEvents about the victim included), and the
    victim's names and identifiers."""
    found: set[str] = set()
    for version in store.history(None):
        patients = compartment_patients(version)
        if victim in patients and attacker not in patients:
            found.add(version["id"])
    patient = store.read("Patient", victim)
    for name in patient.get("name", []):
        found.update(x for x in [name.get("family"), *name.get("given", [])] if x and len(x) > 3)
    found.update(i["value"] for i in patient.get("identifier", []) if len(i.get("value", "")) > 5)
    return found


def _operation_targets(group_id: str, obs: str) -> list[tuple[str, str]]:
    """(method, path) of every registered operation at every level and type its definition declares, aimed at
    the other patient, the study, a Group holding both patients and the other patient's Observation."""
    instance = {"Patient": P2, "ResearchStudy": "tt-201", "Group": group_id, "Observation": obs,
                "ResearchSubject": None, "ConceptMap": None, "CodeSystem": None}
    out = []
    for op in registry.operations():
        paths = [op.name] if "system" in op.levels() else []
        for rtype in op.resource_types:
            types = list(instance) if rtype in ("Resource", "DomainResource") else [rtype]
            for t in types:
                if "type" in op.levels():
                    paths.append(f"{t}/{op.name}")
                if "instance" in op.levels() and instance.get(t):
                    paths.append(f"{t}/{instance[t]}/{op.name}")
        for path in dict.fromkeys(paths):
            out += [("POST", path), ("GET", path)]
    return out


class Probe:
    def __init__(self, combined, token, secrets):
        self.combined, self.token, self.secrets = combined, token, secrets
        self.answers: list[tuple[str, int]] = []

    def __call__(self, method: str, path: str, **kw) -> requests.Response:
        url = path if path.startswith("http") else f"{self.combined.fhir}/{path}".rstrip("/")
        if path.startswith("/"):
            url = self.combined.base + path
        response = call(method, url, self.token, **kw)
        sent = url + json.dumps(kw.get("json")) + json.dumps(kw.get("params")) + json.dumps(kw.get("headers"))
        text = response.text
        assert response.status_code < 500, (method, path, response.status_code, text[:300])
        body = response.json() if text and response.headers.get("Content-Type", "").startswith(FHIR_JSON) else None
        error = isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"
        if isinstance(body, dict) and body.get("resourceType") == "Bundle":
            # a searchset's links repeat the query the client sent; they carry no stored data
            text = json.dumps({k: v for k, v in body.items() if k != "link"})
        # An error may repeat what the request itself said (an id in a refused URL); nothing else of the
        # other patient may appear, and a successful answer may contain none of it at all.
        leaked = [s for s in self.secrets if s in text and not (error and s in sent)]
        assert not leaked, (method, path, response.status_code, leaked[:5], text[:500])
        self.answers.append((f"{method} {path[:80]}", response.status_code))
        return response


def test_a_patient_token_gets_nothing_of_another_patient(combined, admin):
    token = combined.user_token("patient/*.cruds", patient=P1)["access_token"]
    base = combined.fhir
    # set-up by the administrator, before the snapshot: a Group holding both patients, a finished bulk export
    group = call("POST", f"{base}/Group", admin, json={
        "resourceType": "Group", "type": "person", "actual": True, "quantity": 2,
        "member": [{"entity": {"reference": f"Patient/{P1}"}}, {"entity": {"reference": f"Patient/{P2}"}}]}).json()
    export_files = _admin_export(combined, admin)
    before = _stored_compartment(combined.store, P2)
    # the API's view of the compartment (10 searchable types) is part of the store's (every type)
    assert _compartment(combined, admin, P2).items() <= before.items()
    assert {t for t, _ in before} >= {"Patient", "Observation", "ResearchSubject", "Group"}
    secrets = _secrets(combined.store, P1, P2)
    by_type: dict[str, list[str]] = {}
    for rtype, rid in before:
        if rtype != "Group":  # the Group holds p001 too: p001 may read it (with p002 cut out, checked below)
            by_type.setdefault(rtype, []).append(rid)
    probe = Probe(combined, token, secrets)
    obs = by_type["Observation"][0]

    # read and vread of every resource in the other compartment; instance history of each type's first
    for rtype, ids in by_type.items():
        for rid in ids:
            assert probe("GET", f"{rtype}/{rid}").status_code in (403, 404)
        assert probe("GET", f"{rtype}/{ids[0]}/_history/1").status_code in (403, 404)
        assert probe("GET", f"{rtype}/{ids[0]}/_history").status_code in (403, 404)
    # type and system history
    probe("GET", "Observation/_history")
    probe("GET", "_history")
    # searches aimed at the other patient, by every route; a count of the other patient's data is zero
    for rtype, param in COMPARTMENT_SEARCHES.items():
        probe("GET", rtype, params={param: f"Patient/{P2}"})
        for counted in (probe("GET", rtype, params={param: P2, "_summary": "count"}),
                        probe("GET", rtype, params={param: f"Patient/{P2}", "_total": "accurate"})):
            assert counted.status_code >= 400 or counted.json().get("total", 0) == 0, (rtype, counted.text[:300])
        probe("POST", f"{rtype}/_search", data={param: f"Patient/{P2}"},
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    for rtype, param in (("AuditEvent", "patient"), ("AuditEvent", "entity"), ("DetectedIssue", "patient"),
                         ("MeasureReport", "subject"), ("Flag", "subject"), ("CommunicationRequest", "subject")):
        probe("GET", rtype, params={param: f"Patient/{P2}"})
    # unaimed counts equal the attacker's own: nothing of the other patient is counted in
    for rtype, param in COMPARTMENT_SEARCHES.items():
        own = call("GET", f"{base}/{rtype}", admin, params={param: f"Patient/{P1}", "_summary": "count"}).json()["total"]
        everyone = probe("GET", rtype, params={"_summary": "count"})
        if everyone.status_code == 200:
            assert everyone.json()["total"] == own, (rtype, everyone.json()["total"], own)
    probe("GET", "Observation", params={"_id": obs})
    probe("GET", "Patient", params={"_id": P2})
    probe("GET", "Patient", params={"_revinclude": "Observation:subject", "_id": P2})
    probe("GET", "Patient", params={"_revinclude": "*"})
    probe("GET", "Observation", params={"_include": "Observation:subject", "_count": 1000})
    probe("GET", "Observation", params={"_include": "*", "_revinclude": "*", "_count": 1000})
    probe("GET", "ResearchSubject", params={"_include": "ResearchSubject:individual"})
    probe("GET", "ResearchSubject", params={"_summary": "count"})
    probe("GET", "Observation", params={"_total": "accurate", "_count": 0})
    # Groups and cohort operations
    seen = probe("GET", f"Group/{group['id']}")
    assert seen.status_code == 200 and seen.json()["member"] == [{"entity": {"reference": f"Patient/{P1}"}}]
    probe("GET", "Group", params={"member": f"Patient/{P1}"})
    probe("GET", "Group", params={"member": f"Patient/{P2}"})
    probe("GET", "Group", params={"_summary": "count"})
    probe("POST", f"Group/{group['id']}/$simulate", json={"resourceType": "Parameters", "parameter": []})
    probe("POST", f"Group/{group['id']}/$stratify", json={"resourceType": "Parameters", "parameter": []})
    for op in ("$simulate", "$predict-dropout", "$estimate-effect", "$forecast-enrollment", "$fit-population",
               "$optimize-schedule", "$stratify", "$safety-signal", "$train-model"):
        probe("POST", f"ResearchStudy/tt-201/{op}", json={"resourceType": "Parameters", "parameter": []})
    # a study-wide what-if of virtual participants reads no participant, but is still a cohort operation
    assert probe("POST", "ResearchStudy/tt-201/$simulate", json={"resourceType": "Parameters", "parameter": [
        {"name": "virtualParticipants", "valueInteger": 30}]}).status_code == 403
    # operations on the other patient
    for op in ("$simulate", "$calibrate", "$predict-dropout", "$optimize-schedule"):
        probe("POST", f"Patient/{P2}/{op}", json={"resourceType": "Parameters", "parameter": []})
        probe("GET", f"Patient/{P2}/{op}")
    probe("GET", f"Observation/{obs}/$validate")
    probe("POST", f"Observation/{obs}/$validate", json={"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": observation(P1)}]})
    # every registered operation, at every level and type it is declared for, aimed at the other patient's data
    targets = _operation_targets(group["id"], obs)
    assert {path.rsplit("$", 1)[1] for _, path in targets} == {op.code for op in registry.operations()}
    for method, path in targets:
        probe(method, path, **({"json": {"resourceType": "Parameters", "parameter": []}} if method == "POST" else {}))
    # the files of a bulk export the administrator ran
    for url in export_files:
        assert probe("GET", url).status_code in (401, 403, 404)
    # writes: update, delete, create into the other compartment, conditional create aimed at its data
    probe("PUT", f"Observation/{obs}", json={**observation(P1), "id": obs})
    probe("PUT", f"Observation/{obs}", json={**observation(P2), "id": obs})
    probe("DELETE", f"Observation/{obs}")
    probe("POST", "Observation", json=observation(P2))
    probe("POST", "Observation", json=observation(P1), headers={"If-None-Exist": f"_id={obs}"})
    probe("POST", "Observation", json=observation(P1), headers={"If-None-Exist": f"{base}/Observation?_id={obs}"})
    # conditional update and delete are not supported: refused, whatever they would match
    for params in ({"_id": obs}, {"subject": f"Patient/{P2}"}):
        assert probe("PUT", "Observation", json=observation(P1), params=params).status_code >= 400
        assert probe("DELETE", "Observation", params=params).status_code >= 400
    # batch and transaction entries: relative, absolute (ours and another host) and malformed URLs
    urls = [f"Observation/{obs}", f"{base}/Observation/{obs}", f"http://evil.example/fhir/Observation/{obs}",
            f"Observation//{obs}", f"Observation/./{obs}", f"Observation/../Observation/{obs}", f"/Observation/{obs}",
            f"Observation/{obs}/_history/1", f"Observation?_id={obs}", f"Observation/{obs}?_format=json"]
    for kind in ("batch", "transaction"):
        for url in urls:
            for method in ("GET", "PUT", "DELETE"):
                entry = {"request": {"method": method, "url": url}}
                if method == "PUT":
                    entry["resource"] = {**observation(P1), "id": obs}
                probe("POST", "", json={"resourceType": "Bundle", "type": kind, "entry": [entry]})
        for condition in (f"_id={obs}", f"subject=Patient/{P2}", f"Observation?_id={obs}", f"{base}/Observation?_id={obs}"):
            probe("POST", "", json={"resourceType": "Bundle", "type": kind, "entry": [{
                "fullUrl": "urn:uuid:5e1d0b9e-1111-4111-8111-000000000001", "resource": observation(P1),
                "request": {"method": "POST", "url": "Observation", "ifNoneExist": condition}}]})
        probe("POST", "", json={"resourceType": "Bundle", "type": kind, "entry": [{
            "resource": observation(P2), "request": {"method": "POST", "url": "Observation"}}]})

    # the clinician app launched for p001: its pages and actions for p002 and for the study
    _probe_app(combined, secrets)

    after = _stored_compartment(combined.store, P2)
    assert after == before, "the other patient's compartment changed"
    print(f"\ncompartment probe: {len(probe.answers)} requests, {sum(a[1] >= 400 for a in probe.answers)} refused, "
          f"{len(secrets)} strings of {P2}'s data watched for in {len(before)} resources of "
          f"{len({t for t, _ in before})} types, none returned, none written")
    assert len(probe.answers) > 300
    refused = [a for a in probe.answers if a[1] >= 400]
    assert len(refused) > 200  # most of the matrix is refused outright; the rest answers without their data


def _admin_export(combined, admin) -> list[str]:
    """URLs of the files of a finished system-level bulk export run by the administrator."""
    import time

    started = call("GET", f"{combined.fhir}/$export", admin, params={"_type": "Patient,Observation"},
                   headers={"Prefer": "respond-async"})
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 300
    while (done := call("GET", started.headers["Content-Location"], admin)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert done.status_code == 200, done.text
    return [o["url"] for o in done.json()["output"]]


def _probe_app(combined, secrets: set[str]) -> None:
    """The clinician app launched for another participant asked for p002's page, p002's dropout prediction
    (with the form's valid CSRF token) and the study view. The launch is p003's: p001 has left the small
    demo's study, so its page has no prediction form and no CSRF token to send."""
    from tests.smart_app.helpers import UserAgent
    from tests.smart_app.test_clinician_app import PATIENT, launch

    agent = UserAgent()
    own = launch(combined, agent, patient=PATIENT)
    assert own.status_code == 200 and f"<h1>{PATIENT}</h1>" in own.text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', own.text).group(1)
    pages = [agent.session.get(f"{combined.base}/app/patient/{P2}", timeout=120),
             agent.session.get(f"{combined.base}/app/patient/{P2}", params={"dose": "100", "horizon": "30"}, timeout=120),
             agent.session.post(f"{combined.base}/app/patient/{P2}/predict-dropout", data={"csrf_token": csrf},
                                timeout=120, allow_redirects=False),
             agent.session.get(f"{combined.base}/app/study/tt-201", timeout=120)]
    for page in pages:
        assert page.status_code < 500, page.text[:300]
        # the page may name the participant asked for (the URL did); nothing else of p002 may be on it
        leaked = [x for x in secrets if x in page.text.replace(f"Patient/{P2}", "").replace(P2, "")]
        assert not leaked, (page.url, leaked[:5])
    assert pages[0].text.count("Not allowed with this launch") >= 2
    assert pages[2].status_code == 302 and "notice=risk-not-allowed" in pages[2].headers["Location"]


def test_an_async_job_is_polled_only_in_its_own_patient_context(combined, admin):
    """One clinician app, two launches: the token of p002's launch cannot read p001's job."""
    from tests.smart_app.helpers import UserAgent

    client = combined.stack.register_public_app(scope="launch/patient openid fhirUser patient/*.cruds")
    tokens = {}
    for patient in (P1, P2):
        query, verifier = combined.stack.authorize(UserAgent(), client["client_id"],
                                                   "launch/patient openid fhirUser patient/*.cruds", patient=patient)
        tokens[patient] = combined.stack.exchange(client["client_id"], query["code"], verifier).json()["access_token"]
    started = call("POST", f"{combined.fhir}/Patient/{P1}/$simulate", tokens[P1],
                   json={"resourceType": "Parameters", "parameter": []}, headers={"Prefer": "respond-async"})
    assert started.status_code == 202, started.text
    job = started.headers["Content-Location"]
    theirs = call("GET", job, tokens[P2])
    assert theirs.status_code == 403 and P1 not in theirs.text.replace(job, "")
    assert call("DELETE", job, tokens[P2]).status_code == 403
    assert call("GET", job, tokens[P1]).status_code in (200, 202)


@pytest.fixture(scope="module")
def job_tasks(tmp_path_factory):
    """The combined server as ``trialtwin serve --job-tasks`` runs it: finished async jobs become Tasks."""
    yield from combined_server(tmp_path_factory, JOB_TASKS=True)


def test_a_finished_jobs_task_is_in_its_patients_compartment_only(job_tasks):
    """The Task a finished job leaves (``--job-tasks``) is read like the participant's other data: by that
    participant's token, and not by another participant's, neither read nor found by search."""
    from tests.smart_app.helpers import UserAgent

    scope = "launch/patient openid fhirUser patient/*.cruds"
    client = job_tasks.stack.register_public_app(scope=scope)
    tokens = {}
    for patient in (P1, P2):
        query, verifier = job_tasks.stack.authorize(UserAgent(), client["client_id"], scope, patient=patient)
        tokens[patient] = job_tasks.stack.exchange(client["client_id"], query["code"], verifier).json()["access_token"]
    started = call("POST", f"{job_tasks.fhir}/Patient/{P1}/$simulate", tokens[P1],
                   json={"resourceType": "Parameters", "parameter": []}, headers={"Prefer": "respond-async"})
    assert started.status_code == 202, started.text
    job = started.headers["Content-Location"]
    deadline = time.monotonic() + 300
    while call("GET", job, tokens[P1]).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.1)
    task_url = f"{job_tasks.fhir}/Task/job-{job.rsplit('/', 1)[1]}"
    own = call("GET", task_url, tokens[P1])
    assert own.status_code == 200 and own.json()["for"] == {"reference": f"Patient/{P1}"}, own.text[:300]
    assert own.json()["status"] == "completed"
    theirs = call("GET", task_url, tokens[P2])
    assert theirs.status_code in (403, 404) and P1 not in theirs.text
    found = call("GET", f"{job_tasks.fhir}/Task", tokens[P2], params={"_id": own.json()["id"]})
    assert found.status_code == 200 and not found.json().get("entry") and found.json().get("total", 0) == 0
    aimed = call("GET", f"{job_tasks.fhir}/Task", tokens[P2], params={"patient": f"Patient/{P1}"})
    assert aimed.status_code == 200 and not aimed.json().get("entry") and aimed.json().get("total", 0) == 0
