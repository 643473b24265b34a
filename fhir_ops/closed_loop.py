"""The closed loop: a participant's twin is recalibrated in the background when new data of theirs arrive.

A watcher finds new measured Observations by store search (``_lastUpdated`` at or after a persisted
cursor), so data from any path or process count: REST, transactions, loads, ``listen-hl7``. Each
participant is debounced (a burst of results is one recalibration), the work per minute is bounded,
and a study turns it off with the ResearchStudy extension ``CLOSED_LOOP_EXTENSION`` (valueBoolean
false). Recalibration is ``$calibrate`` itself, so the new twin-state version and its Provenance
(which names every Observation version it was calibrated on) are exactly what a call would store.
A changed twin's forecast is then stored by ``$simulate`` (``persist=true``) and the participant's
dropout risk re-assessed by ``$predict-dropout`` (a new RiskAssessment, the open outreach Task refreshed
rather than duplicated), so a Subscription on RiskAssessment or on forecasts sees the change.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time

from fhir_ops import watch
from fhir_ops.errors import FhirError

log = logging.getLogger(__name__)

CLOSED_LOOP_EXTENSION = "https://trialtwin.org/fhir/StructureDefinition/twin-closed-loop"
_SIMULATED = "https://trialtwin.org/fhir/CodeSystem/trialtwin|simulated"


def study_allows(study: dict | None) -> bool:
    """Whether the study leaves the closed loop on (the default) or turns it off by extension."""
    for ext in (study or {}).get("extension") or []:
        if ext.get("url") == CLOSED_LOOP_EXTENSION and ext.get("valueBoolean") is False:
            return False
    return True


class ClosedLoop:
    """Watcher and worker threads recalibrating twins of participants with new data.

    Parameters
    ----------
    app : flask.Flask
        The app whose ``$calibrate`` is run (in an app context) and whose store is watched.
    state_path : str
        SQLite file holding the watcher's cursor, so data arriving while the server is down count.
    debounce : float
        Seconds after a participant's latest new Observation before the recalibration starts.
    max_per_minute : int
        Most recalibrations started in any 60 s; the rest wait their turn.
    """

    def __init__(self, app, state_path: str, *, debounce: float = 5.0, max_per_minute: int = 30,
                 poll_seconds: float = 0.25) -> None:
        self.app = app
        self.store = app.extensions["trialtwin.store"]
        self.debounce = debounce
        self.max_per_minute = max_per_minute
        self.poll_seconds = poll_seconds
        self.path = state_path
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS cursor (name TEXT PRIMARY KEY, lu TEXT NOT NULL, seen TEXT NOT NULL)")
        self.pending: dict[str, tuple[float, list[str]]] = {}  # patient id -> (due, triggering refs)
        self.started: collections.deque = collections.deque()
        self.log: list[dict] = []  # decisions, newest last (tests, operators)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _db(self):
        return watch.state_db(self.path)  # closed after each use (see watch.state_db)

    def start(self) -> "ClosedLoop":
        from datetime import datetime, timezone

        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        with self._db() as db:  # a new data directory starts now, not with the data already there
            db.execute("INSERT OR IGNORE INTO cursor VALUES ('Observation', ?, '[]')", (now,))
        self._threads = [threading.Thread(target=self._loop, args=(self.poll_once,), name="closed-loop-watch",
                                          daemon=True),
                         threading.Thread(target=self._loop, args=(self.work_once,), name="closed-loop-work",
                                          daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _loop(self, step) -> None:
        while not self._stop.is_set():
            try:
                step()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad round
                log.exception("closed loop")
            self._stop.wait(self.poll_seconds)

    # -- watching ----------------------------------------------------------------------------------
    def poll_once(self) -> int:
        """Note participants with new measured Observations; the number of Observations seen."""
        with self._db() as db:
            lu, seen = db.execute("SELECT lu, seen FROM cursor WHERE name = 'Observation'").fetchone()
        new, newest, at_newest = watch.changes(self.store, "Observation", [("_tag:not", _SIMULATED)], lu,
                                               set(json.loads(seen)))
        if not new:
            return 0
        due = time.monotonic() + self.debounce
        with self._lock:
            for r in new:
                ref = (r.get("subject") or {}).get("reference", "")
                if not ref.startswith("Patient/"):
                    continue
                pid = ref.partition("/")[2]
                _, refs = self.pending.get(pid, (0.0, []))
                self.pending[pid] = (due, [*refs, f"Observation/{r['id']}/_history/{r['meta']['versionId']}"])
        with self._db() as db:
            db.execute("UPDATE cursor SET lu = ?, seen = ? WHERE name = 'Observation'",
                       (newest, json.dumps(sorted(at_newest))))
        return len(new)

    # -- working -----------------------------------------------------------------------------------
    def work_once(self) -> int:
        """Recalibrate the participants whose debounce has passed, within the per-minute bound."""
        done = 0
        while True:
            now = time.monotonic()
            while self.started and now - self.started[0] > 60:
                self.started.popleft()
            if len(self.started) >= self.max_per_minute:
                return done
            with self._lock:
                ready = sorted((due, pid) for pid, (due, _) in self.pending.items() if due <= now)
                if not ready:
                    return done
                pid = ready[0][1]
                _, refs = self.pending.pop(pid)
            self.started.append(now)
            self._recalibrate(pid, refs)
            done += 1

    def _recalibrate(self, pid: str, refs: list[str]) -> None:
        from fhir_ops.operations import twin_common

        entry = {"patient": pid, "trigger": refs, "at": time.time()}
        try:
            with self.app.app_context():
                study = twin_common.study_of_patient(self.store, pid)
                if study is None:
                    entry["decision"] = "skipped: not enrolled in a study"
                elif not study_allows(study):
                    entry["decision"] = f"skipped: ResearchStudy/{study['id']} turns the closed loop off"
                else:
                    out = _outputs(self._invoke("calibrate", pid))
                    entry["decision"] = "recalibrated" if out.get("changed") else "unchanged"
                    entry["twinState"] = (out.get("twinState") or {}).get("reference")
                    entry["provenance"] = (out.get("provenance") or {}).get("reference")
                    if out.get("changed"):
                        entry["forecast"] = self._store_forecast(pid)
                    entry["dropout"] = self._reassess_dropout(pid)
        except FhirError as exc:
            entry["decision"] = f"failed: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - one participant's failure must not stop the loop
            log.exception("closed loop: recalibrating Patient/%s", pid)
            entry["decision"] = f"failed: {type(exc).__name__}"
        log.info("closed loop: Patient/%s %s", pid, entry["decision"])
        with self._lock:
            self.log.append(entry)
            del self.log[:-1000]

    def _invoke(self, name: str, pid: str, params: dict | None = None) -> dict:
        """Run a Patient-level operation as a call with ``params`` (else its defaults) would; its Parameters body."""
        from fhir_ops.operations import registry

        op = registry.get(name)
        ctx = registry.OperationContext(op, "instance", "Patient", pid, self.app.config.get("BASE_URL") or "")
        return registry.invoke(op, ctx, params or {})[1]

    def _store_forecast(self, pid: str) -> dict:
        """``$simulate`` with ``persist=true`` from the new twin state: forecast Observations (tagged
        simulated, so they never trigger the loop) and their Provenance; a model whose forecasts cannot
        be stored yet is recorded, not an error of the loop."""
        try:
            body = self._invoke("simulate", pid, {"persist": True})
        except FhirError as exc:
            return {"decision": f"not stored: {exc.message}"}
        out = _outputs(body)
        return {"decision": "stored", "provenance": (out.get("provenance") or {}).get("reference"),
                "observations": sum(p["name"] == "forecastObservation" for p in body.get("parameter", []))}

    def _reassess_dropout(self, pid: str) -> dict:
        """``$predict-dropout`` for the participant after new data (stored RiskAssessment, outreach Task
        refreshed, not duplicated); a participant it cannot assess is recorded, not an error of the loop."""
        try:
            body = self._invoke("predict-dropout", pid)
        except FhirError as exc:
            return {"decision": f"not assessed: {exc.message}"}
        out = _outputs(body)
        prediction = next((p for p in body.get("parameter", []) if p["name"] == "prediction"), None)
        if prediction is None:
            return {"decision": "not assessed: " + ("off study" if out.get("skipped") else "see the operation's issues")}
        parts = _outputs({"parameter": prediction["part"]})
        return {"decision": "assessed", "probability": parts.get("probability"), "flagged": parts.get("flagged"),
                "riskAssessment": (parts.get("riskAssessment") or {}).get("reference")}


def _outputs(body: dict) -> dict:
    """A Parameters body's top-level values by name (parts left out)."""
    return {p["name"]: next((v for k, v in p.items() if k.startswith("value")), None)
            for p in body.get("parameter", []) if "part" not in p}


def init_app(app) -> None:
    """Start the closed loop when ``CLOSED_LOOP`` is on (``trialtwin serve`` turns it on).

    Config: ``CLOSED_LOOP_DEBOUNCE`` (s, default 5), ``CLOSED_LOOP_MAX_PER_MINUTE`` (default 30),
    ``CLOSED_LOOP_POLL`` (s). The service is ``app.extensions["trialtwin.closed_loop"]``.
    """
    if not app.config.get("CLOSED_LOOP"):
        return
    service = ClosedLoop(app, os.path.join(app.config["DATA_DIR"], "trialtwin-closed-loop.sqlite"),
                         debounce=float(app.config.get("CLOSED_LOOP_DEBOUNCE", 5.0)),
                         max_per_minute=int(app.config.get("CLOSED_LOOP_MAX_PER_MINUTE", 30)),
                         poll_seconds=float(app.config.get("CLOSED_LOOP_POLL", 0.25)))
    app.extensions["trialtwin.closed_loop"] = service.start()


__all__ = ["CLOSED_LOOP_EXTENSION", "ClosedLoop", "init_app", "study_allows"]
