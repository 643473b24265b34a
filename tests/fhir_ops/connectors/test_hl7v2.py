"""HL7 v2 over MLLP: real sockets, the real store, answers read as a sender reads them (MSA, ERR)."""
from __future__ import annotations

import socket

import hl7
import pytest

from fhir_ops.app import create_app
from fhir_ops.connectors.hl7v2 import Hl7Ingest
from fhir_ops.connectors.mllp import FrameReader, MllpClient, MllpServer, frame
from tests.app_config import open_config
from tests.fhir_ops.conftest import FhirClient
from tests.fhir_ops.connectors.hl7_messages import adt, good_oru, msh, obx, oru
from tests.live_server import serve

pytestmark = pytest.mark.api
SUBJECT_SYSTEM = "https://trialtwin.org/fhir/sid/tt-201-subject"


class Site:
    """The FHIR server and the MLLP listener over one embedded store."""

    def __init__(self, base: str, port: int, ingest: Hl7Ingest):
        self.fhir = FhirClient(base + "/fhir")
        self.port = port
        self.ingest = ingest

    def send(self, message: str) -> hl7.Message:
        with MllpClient("127.0.0.1", self.port) as client:
            return hl7.parse(client.send(message))

    def search(self, query: str) -> list[dict]:
        resp = self.fhir.get(query)
        assert resp.status_code == 200, resp.text
        return [e["resource"] for e in resp.json().get("entry", [])]


@pytest.fixture
def site(tmp_path):
    app = create_app(open_config(DATA_DIR=str(tmp_path)))
    store = app.extensions["trialtwin.store"]
    ingest = Hl7Ingest(store)
    server = MllpServer(("127.0.0.1", 0), ingest.handle, handler_many=ingest.handle_many,
                        on_connection=ingest.connection)
    server.start()
    try:
        with serve(app) as base:
            yield Site(base, server.server_address[1], ingest)
    finally:
        server.shutdown()
        server.server_close()
        ingest.close()
        store.close()


def msa(ack: hl7.Message) -> tuple[str, str]:
    seg = ack.segment("MSA")
    return str(seg[1]), str(seg[2])


def err_location(ack: hl7.Message) -> tuple[str, str, str, str]:
    """(segment, sequence, field, table 0357 code) from ERR-2 and ERR-3."""
    err = ack.segment("ERR")
    return (ack.extract_field("ERR", 1, 2, 1, 1), ack.extract_field("ERR", 1, 2, 1, 2),
            ack.extract_field("ERR", 1, 2, 1, 3), str(err[3][0][0]))


def registered(site: Site, subject: str = "TT201-001") -> str:
    ack = site.send(adt("ADT1-" + subject, subject))
    assert msa(ack) == ("AA", "ADT1-" + subject), str(ack)
    [patient] = site.search(f"Patient?identifier={SUBJECT_SYSTEM}|{subject}")
    return patient["id"]


def test_adt_registers_and_updates_a_participant(site):
    pid = registered(site)
    ack = site.send(adt("ADT2", "TT201-001", family="Smith", event="A08"))
    assert msa(ack) == ("AA", "ADT2")
    [patient] = site.search(f"Patient?identifier={SUBJECT_SYSTEM}|TT201-001")
    assert patient["id"] == pid and patient["name"][0]["family"] == "Smith"
    assert (patient["gender"], patient["birthDate"]) == ("female", "1961-04-12")
    assert patient["meta"]["versionId"] == "2"


def test_good_oru_is_stored_as_loinc_and_ucum_observations(site):
    pid = registered(site)
    ack = site.send(good_oru("MSG1", "TT201-001", hba1c="7.4", fpg_mmol="5.5"))
    assert msa(ack) == ("AA", "MSG1"), str(ack)
    [a1c] = site.search(f"Observation?subject=Patient/{pid}&code=http://loinc.org|4548-4")
    assert a1c["valueQuantity"] == {"value": 7.4, "unit": "percent", "system": "http://unitsofmeasure.org",
                                    "code": "%"}
    assert a1c["effectiveDateTime"] == "2026-11-20T09:00:00Z" and a1c["status"] == "final"
    [fpg] = site.search(f"Observation?subject=Patient/{pid}&code=http://loinc.org|1558-6")
    # 5.5 mmol/L glucose (180.156 g/mol) = 99.0858 mg/dL, the original kept beside it
    assert fpg["valueQuantity"]["code"] == "mg/dL"
    assert fpg["valueQuantity"]["value"] == pytest.approx(5.5 * 180.156 / 10, rel=1e-9)
    assert fpg["valueQuantity"]["extension"][0]["valueQuantity"]["code"] == "mmol/L"


def test_a_resent_message_is_stored_once(site):
    pid = registered(site)
    for _ in range(2):
        assert msa(site.send(good_oru("MSG1", "TT201-001")))[0] == "AA"
    assert len(site.search(f"Observation?subject=Patient/{pid}")) == 2


@pytest.mark.parametrize("message, location, condition", [
    # unknown local code in the second OBX: the good first OBX must not be stored either
    (oru("BAD1", "TT201-001", obx(1, "LAB-HBA1C", "7.4", "%^^UCUM"), obx(2, "LAB-XYZ", "1", "mg/dL^^UCUM")),
     ("OBX", "2", "3"), "103"),
    # HbA1c in kg: not convertible to %
    (oru("BAD2", "TT201-001", obx(1, "LAB-FPG", "5.5", "mmol/L^^UCUM"), obx(2, "LAB-HBA1C", "7.4", "kg^^UCUM")),
     ("OBX", "2", "6"), "103"),
    (oru("BAD3", "TT201-001", obx(1, "LAB-HBA1C", "seven", "%^^UCUM")), ("OBX", "1", "5"), "102"),
    (oru("BAD4", "TT201-001", obx(1, "LAB-HBA1C", "7.4", "%^^UCUM", system="99NOPE")), ("OBX", "1", "3"), "103"),
    (oru("BAD5", "TT201-001", obx(1, "LAB-HBA1C", "7.4", "%^^UCUM", status="")), ("OBX", "1", "11"), "101"),
    (oru("BAD6", "TT201-001", obx(1, "LAB-HBA1C", "7.4", "%^^UCUM", when="2026-11-20")), ("OBX", "1", "14"), "102"),
    (oru("BAD7", "TT201-001", obx(1, "LAB-HBA1C", "7.4", "")), ("OBX", "1", "6"), "101"),
    (good_oru("BAD8", "TT201-999"), ("PID", "1", "3"), "204"),
], ids=["unknown-code", "wrong-unit", "not-a-number", "unknown-coding-system", "no-status", "bad-date",
        "no-unit", "unknown-participant"])
def test_content_errors_are_ae_naming_segment_and_field_and_store_nothing(site, message, location, condition):
    pid = registered(site)
    ack = site.send(message)
    assert msa(ack)[0] == "AE", str(ack)
    assert err_location(ack) == (*location, condition), str(ack)
    assert site.search(f"Observation?subject=Patient/{pid}") == []
    assert site.search("Observation") == []


@pytest.mark.parametrize("message, field, condition", [
    ("this is not HL7", "", "101"),
    (msh("ORM^O01^ORM_O01", "X1") + "\rPID|1||TT201-001^^^TT201", "9", "200"),
    (msh("ADT^A31^ADT_A05", "X2") + "\rPID|1||TT201-001^^^TT201", "9", "201"),
    (msh("ORU^R01^ORU_R01", "") + "\rPID|1||TT201-001^^^TT201", "10", "101"),
], ids=["not-hl7", "unsupported-type", "unsupported-event", "no-control-id"])
def test_malformed_or_unsupported_messages_are_rejected_ar(site, message, field, condition):
    ack = site.send(message)
    assert msa(ack)[0] == "AR", str(ack)
    assert err_location(ack) == ("MSH", "1", field, condition), str(ack)


def test_one_connection_carries_many_messages_in_order(site):
    registered(site)
    with MllpClient("127.0.0.1", site.port) as client:
        # pipelined: all frames first, then the answers, in order
        client.sock.sendall(b"".join(frame(good_oru(f"P{i}", "TT201-001")) for i in range(20)))
        acks = [hl7.parse(client.receive()) for _ in range(20)]
    assert [msa(a) for a in acks] == [("AA", f"P{i}") for i in range(20)]
    assert len(site.search("Observation?_count=100")) == 40


def test_pipelined_messages_share_commits_but_each_stands_alone(site):
    """A registration, results that need it, a bad result and a resend, all in one write: every message
    is answered in order as if sent alone (the bad one stores nothing, its neighbours everything)."""
    registered(site)
    messages = [adt("NEW-1", "TT201-002"), good_oru("Q1", "TT201-002"), good_oru("Q2", "TT201-001"),
                oru("Q3", "TT201-001", obx(1, "LAB-HBA1C", "7.1", "%^^UCUM"), obx(2, "LAB-XYZ", "1", "mg/dL^^UCUM")),
                good_oru("Q4", "TT201-002"), good_oru("Q1", "TT201-002"), good_oru("Q5", "TT201-999")]
    with MllpClient("127.0.0.1", site.port) as client:
        client.sock.sendall(b"".join(frame(m) for m in messages))
        acks = [hl7.parse(client.receive()) for _ in messages]
    assert [msa(a) for a in acks] == [("AA", "NEW-1"), ("AA", "Q1"), ("AA", "Q2"), ("AE", "Q3"), ("AA", "Q4"),
                                      ("AA", "Q1"), ("AE", "Q5")]
    assert err_location(acks[3]) == ("OBX", "2", "3", "103") and err_location(acks[6])[:3] == ("PID", "1", "3")
    [new] = site.search(f"Patient?identifier={SUBJECT_SYSTEM}|TT201-002")
    assert len(site.search(f"Observation?subject=Patient/{new['id']}&_count=100")) == 4  # Q1 once, Q4
    assert len(site.search("Observation?_count=100")) == 6  # and Q2; nothing of Q3


def test_the_writer_knows_how_many_senders_are_connected(site):
    import time

    def settled(n):  # a closed connection's server thread notices the close a moment later
        deadline = time.monotonic() + 30
        while site.ingest.writer.connections != n and time.monotonic() < deadline:
            time.sleep(0.01)
        return site.ingest.writer.connections

    registered(site)
    assert settled(0) == 0
    with MllpClient("127.0.0.1", site.port) as a, MllpClient("127.0.0.1", site.port) as b:
        assert "MSA|AA" in a.send(good_oru("K1", "TT201-001")) and "MSA|AA" in b.send(good_oru("K2", "TT201-001"))
        assert site.ingest.writer.connections == 2  # both answered: both are being served
    assert settled(0) == 0


def test_group_commit_waits_for_messages_being_prepared_and_keeps_each_all_or_nothing(tmp_path):
    from fhir_ops.connectors.hl7v2 import GroupCommit
    from fhir_ops.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "t.sqlite"))
    writer = GroupCommit(store, max_group=64, linger=30.0)
    try:
        def bundle(i, valid=True):
            obs = {"resourceType": "Observation", "status": "final" if valid else "not-a-status",
                   "code": {"text": f"n{i}"}}
            return {"resourceType": "Bundle", "type": "transaction",
                    "entry": [{"resource": obs, "request": {"method": "POST", "url": "Observation"}}]}

        writer.preparing_add(10)  # ten messages on their way: the writer waits for all of them
        futures = [writer.submit_async(bundle(i, valid=i != 4)) for i in range(10)]
        writer.preparing_add(-10)
        outcomes = [f.exception(timeout=30) for f in futures]
        assert [o is None for o in outcomes] == [i != 4 for i in range(10)]
        assert store.search("Observation", [("_summary", "count")]).total == 9
        # one failed group commit of ten, then each alone: nine commits, no more
        assert writer.commits == 9 and writer.messages == 9
        writer.preparing_add(3)
        futures = [writer.submit_async(bundle(i)) for i in range(3)]
        writer.preparing_add(-3)
        assert all(f.exception(timeout=30) is None for f in futures)
        assert writer.commits == 10 and writer.messages == 12  # three messages, one commit
    finally:
        writer.close()
        store.close()


def test_a_sender_outside_the_allowed_networks_gets_no_connection(tmp_path):
    ingest = Hl7Ingest(create_app(open_config(DATA_DIR=str(tmp_path))).extensions["trialtwin.store"])
    server = MllpServer(("127.0.0.1", 0), ingest.handle, allow=["10.0.0.0/8"])
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as sock:
            sock.sendall(frame(adt("A1", "TT201-001")))
            assert sock.recv(100) == b""  # closed unanswered
    finally:
        server.shutdown()
        server.server_close()
        ingest.close()
        ingest.store.close()
    assert ingest.counts == {"AA": 0, "AE": 0, "AR": 0}


@pytest.mark.unit
def test_frame_reader_splits_frames_and_drops_bytes_outside_them():
    reader = FrameReader(limit=50)
    assert reader.feed(b"noise\x0bA|1\x1c\r\x0bB|") == [b"A|1"]
    assert reader.feed(b"2\x1c\r") == [b"B|2"]
    with pytest.raises(ValueError):
        reader.feed(b"\x0b" + b"x" * 60)


@pytest.mark.unit
@pytest.mark.parametrize("value, expected", [
    ("2026", "2026"), ("202611", "2026-11"), ("20261120", "2026-11-20"), ("202611200930", "2026-11-20T09:30:00Z"),
    ("20261120093015.25+0100", "2026-11-20T09:30:15.25+01:00"), ("20261320", None), ("20260230", None),
    ("2026-11-20", None), ("20261120093015+01", None)])
def test_hl7_timestamps_become_fhir_datetimes_or_a_data_type_error(value, expected):
    from fhir_ops.mapping.hl7v2 import Hl7Fault, _timestamp

    if expected is None:
        with pytest.raises(Hl7Fault) as err:
            _timestamp(value, "OBX", 2, 14)
        assert (err.value.segment, err.value.sequence, err.value.field, err.value.condition[0]) == ("OBX", 2, 14, "102")
    else:
        assert _timestamp(value, "OBX", 2, 14) == expected


def test_the_listen_hl7_command_serves_until_terminated(tmp_path):
    import subprocess
    import sys

    from fhir_ops.store.sqlite import SQLiteStore

    with socket.socket() as s:  # a free port for the command
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fhir_ops.cli", "listen-hl7", "--port", str(port),
                             "--data-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert f"MLLP on 127.0.0.1:{port}" in proc.stdout.readline()
        with MllpClient("127.0.0.1", port) as client:
            assert msa(hl7.parse(client.send(adt("CLI1", "TT201-007")))) == ("AA", "CLI1")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err  # SIGTERM: a clean stop
    assert "'AA': 1" in err
    store = SQLiteStore(str(tmp_path / "trialtwin.sqlite"))
    try:
        [patient] = store.search("Patient", [("identifier", f"{SUBJECT_SYSTEM}|TT201-007")]).matches
        assert patient["name"][0]["family"] == "Doe"
    finally:
        store.close()


@pytest.mark.parametrize("linger", ["-1", "1001"])
def test_listen_hl7_refuses_a_linger_outside_0_to_1000_ms(linger, tmp_path):
    from fhir_ops.cli import main

    with pytest.raises(SystemExit, match="--linger-ms must be between 0 and 1000"):
        main(["listen-hl7", "--port", "0", "--data-dir", str(tmp_path), "--linger-ms", linger])


def test_the_linger_reaches_the_group_commit(tmp_path):
    from fhir_ops.connectors.hl7v2 import Hl7Ingest
    from fhir_ops.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "trialtwin.sqlite"))
    ingest = Hl7Ingest(store, linger=0.007)
    try:
        assert ingest.writer.linger == 0.007
    finally:
        ingest.close()
        store.close()
