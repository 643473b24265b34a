"""Study-level ``$simulate`` over real HTTP on a real dask.distributed cluster (2 worker processes):
20,000 virtual participants, identical to the in-process run; the server's scheduler connection and
its refusal when the scheduler cannot be reached.
"""
from __future__ import annotations

import pytest
import requests

from fhir_ops import executor, jobs
from fhir_ops.app import create_app
from fhir_ops.errors import FhirError
from tests.app_config import open_config
from tests.fhir_ops.operations.conftest import get_store_of
from fhir_ops.mapping import model_definition as fm
from inference.model_definition import shipped_definition
from tests.fhir_ops.operations.twin_client import HEADERS, entries, error_id, params, simulate
from tests.live_server import serve

pytestmark = [pytest.mark.api, pytest.mark.slow]

distributed = pytest.importorskip("distributed", reason="the 'dask' extra is part of the test install")

MODEL = fm.compile_definition(shipped_definition("tt201"))
LIBRARY = fm.definition_library(MODEL)
STUDY = fm.with_study_model({"resourceType": "ResearchStudy", "id": "virtual-study", "status": "active",
                             "arm": [{"name": "placebo"}, {"name": "50 mg"}, {"name": "100 mg"}]}, MODEL.canonical)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  death_timeout=120) as cluster, distributed.Client(cluster) as watcher:
        watcher.wait_for_workers(2, timeout=120)
        yield cluster, watcher


def _server(data_dir, **config):
    app = create_app(open_config(TESTING=True, DATA_DIR=str(data_dir), **config))
    with app.app_context():
        get_store_of(app).update("Library", LIBRARY["id"], dict(LIBRARY))
        get_store_of(app).update("ResearchStudy", STUDY["id"], dict(STUDY))
    return app


def _close(app):
    jobs.manager(app).shutdown()
    executor.close(app.extensions.get(executor.EXTENSION_KEY))
    get_store_of(app).close()


def test_twenty_thousand_virtual_participants_on_the_cluster_equal_the_in_process_run(cluster, tmp_path):
    local_cluster, watcher = cluster
    body = params(virtualParticipants=20_000, horizonDays=56, stepHours=168, seed=13, memberOutputs=True)
    in_process = _server(tmp_path / "local")
    on_dask = _server(tmp_path / "dask", DASK_SCHEDULER=local_cluster.scheduler_address)
    try:
        assert in_process.extensions[executor.EXTENSION_KEY] is None
        client = on_dask.extensions[executor.EXTENSION_KEY]
        assert client.scheduler.address == local_cluster.scheduler_address
        with serve(in_process) as url:
            local = simulate(f"{url}/fhir", "ResearchStudy/virtual-study", body)
        with serve(on_dask) as url, distributed.get_task_stream(watcher) as stream:
            remote = simulate(f"{url}/fhir", "ResearchStudy/virtual-study", body)
    finally:
        _close(in_process)
        _close(on_dask)
    assert local.status_code == 200, local.text
    assert remote.status_code == 200, remote.text
    assert remote.json() == local.json()  # every per-arm quantile and member value, to the last digit
    arms = entries(remote.json(), "armSummary")
    assert {a["arm"]: a["participants"] for a in arms} == {"placebo": 6667, "50 mg": 6667, "100 mg": 6666}
    assert len(entries(remote.json(), "member")) == 20_000 * 3
    end = {a["arm"]: a["median"] for a in arms if a["output"] == "hba1c" and a["day"] == 55}
    assert end["100 mg"] < end["50 mg"] < end["placebo"]
    # the chunks (1000 participants each) really ran on the cluster, spread over both workers
    chunks = [t for t in stream.data if t["key"].startswith("_population_chunk")]
    assert len(chunks) == 21 and len({t["worker"] for t in chunks}) == 2


def test_virtual_participants_bad_input(tmp_path):
    app = _server(tmp_path)
    try:
        with app.app_context():
            get_store_of(app).update("ResearchStudy", "no-arms",
                                     fm.with_study_model({"resourceType": "ResearchStudy", "id": "no-arms",
                                                         "status": "active"}, MODEL.canonical))
            get_store_of(app).update("Group", "g", {"resourceType": "Group", "id": "g", "type": "person",
                                                    "actual": False, "quantity": 10})
        with serve(app) as url:
            base = f"{url}/fhir"
            too_many = simulate(base, "ResearchStudy/virtual-study", params(virtualParticipants=100_001))
            assert too_many.status_code == 400 and error_id(too_many) == "parameter-out-of-range"
            zero = simulate(base, "ResearchStudy/virtual-study", params(virtualParticipants=0))
            assert zero.status_code == 400 and "virtualParticipants" in zero.text
            no_arms = simulate(base, "ResearchStudy/no-arms", params(virtualParticipants=30))
            assert no_arms.status_code == 422 and error_id(no_arms) == "study-without-arms"
            on_group = simulate(base, "Group/g", params(virtualParticipants=30))
            assert on_group.status_code == 400 and error_id(on_group) == "parameter-not-applicable"
            as_text = requests.post(f"{base}/ResearchStudy/virtual-study/$simulate", headers=HEADERS, timeout=30,
                                    json={"resourceType": "Parameters", "parameter": [
                                        {"name": "virtualParticipants", "valueString": "many"}]})
            assert as_text.status_code == 400
            missing = simulate(base, "ResearchStudy/absent", params(virtualParticipants=30))
            assert missing.status_code == 404
    finally:
        _close(app)


def test_an_unreachable_scheduler_stops_the_server_at_start_up(tmp_path, capsys):
    from fhir_ops import cli

    with pytest.raises(FhirError) as caught:
        executor.connect("tcp://127.0.0.1:9", timeout=2)
    assert caught.value.error_id == "dask-scheduler-unreachable"
    assert "tcp://127.0.0.1:9" in caught.value.message
    status = cli.main(["serve", "--auth", "open", "--port", "0", "--data-dir", str(tmp_path),
                       "--dask-scheduler", "tcp://127.0.0.1:9"])
    assert status == 1
    err = capsys.readouterr().err
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err
    assert not (tmp_path / "trialtwin.sqlite").exists()  # stopped before the store was opened
    with pytest.raises(FhirError) as caught:
        executor.connect("tcp://no-port-here")
    assert caught.value.error_id == "bad-dask-scheduler" and caught.value.status == 400
