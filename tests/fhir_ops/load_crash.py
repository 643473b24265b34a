"""Kill-and-resume runs of ``trialtwin load``: a corpus with known unique resources, SIGKILLs, and the checks.

Shared by tests/fhir_ops/test_load_resume.py (20k lines in CI) and bench/load_resume_bench.py (10^6 lines).
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Corpus:
    """An NDJSON file and what loading it must give: the explicit ids and the count of id-less resources."""

    path: Path
    lines: int
    ids: set[str] = field(default_factory=set)
    idless_unique: int = 0

    @property
    def unique(self) -> int:
        return len(self.ids) + self.idless_unique


def write_corpus(path: Path, n_lines: int, seed: int = 11) -> Corpus:
    """Observations and Patients; ~half without an id; ~5 % of lines repeat an earlier line exactly.

    Every generated resource differs from the others (its name or value carries ``i``); uniqueness is
    tracked here from the generator's own keys, not from the loader's content ids.
    """
    rng = random.Random(seed)
    corpus = Corpus(path, n_lines)
    idless_keys: set[tuple] = set()
    written: deque[str] = deque(maxlen=1000)  # repeats come from the last 1000 lines
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_lines):
            if written and rng.random() < 0.05:  # an exact repeat of an earlier line: no new resource
                fh.write(rng.choice(written))
                continue
            if i % 25 == 0:
                resource = {"resourceType": "Patient", "name": [{"family": f"F{i}"}],
                            "gender": ("female", "male")[i % 2],
                            "birthDate": f"{1940 + i % 60}-0{1 + i % 9}-1{i % 9}"}
                key = ("Patient", i)
            else:
                resource = {"resourceType": "Observation", "status": "final",
                            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                            "subject": {"reference": f"Patient/p{i % 400}"},
                            "effectiveDateTime": f"2024-0{1 + i % 9}-1{i % 9}T08:00:00Z",
                            "valueQuantity": {"value": i / 100, "unit": "%",
                                              "system": "http://unitsofmeasure.org", "code": "%"}}
                key = ("Observation", i)
            if rng.random() < 0.5:
                resource["id"] = f"{resource['resourceType'][:3].lower()}-{i}"
                corpus.ids.add(resource["id"])
            else:
                idless_keys.add(key)
            line = json.dumps(resource) + "\n"
            written.append(line)
            fh.write(line)
    corpus.idless_unique = len(idless_keys)
    return corpus


def run_load(ndjson: Path, data_dir: Path, *, workers: int, batch_size: int, kill_after: int | None,
             timeout_s: float = 1800.0) -> dict:
    """Run ``trialtwin load`` in its own process group; SIGKILL the group after ``kill_after`` stored batches.

    Returns the exit code, the stored-batch lines seen and the skip line. The kill is triggered by the
    load's own progress output (no sleeps); a watchdog kills a run that hangs past ``timeout_s``.
    """
    cmd = [sys.executable, "-m", "fhir_ops.cli", "load", str(ndjson), "--data-dir", str(data_dir),
           "--workers", str(workers), "--batch-size", str(batch_size)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    watchdog = threading.Timer(timeout_s, lambda: _kill_group(proc))
    watchdog.start()
    stored, skipped, killed = 0, None, False
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if " stored (" in line:
                stored += 1
                if kill_after is not None and stored >= kill_after and not killed:
                    _kill_group(proc)
                    killed = True
            elif "already stored by an earlier run" in line:
                skipped = line.strip()
        out = proc.stdout.read()
        code = proc.wait()
    finally:
        watchdog.cancel()
        _kill_group(proc)  # nothing of a run may outlive it
    return {"returncode": code, "killed": killed, "stored_batches": stored, "skipped": skipped,
            "stdout": out, "stderr_tail": "".join(lines[-5:])}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check_store(db: Path, corpus: Corpus) -> dict:
    """What the store holds after the runs, next to what the corpus says it must hold."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT type, id FROM resources WHERE deleted = 0").fetchall()
        ids = [r[1] for r in rows]
        keys = {(t, i) for t, i in rows}
        return {
            "resources": len(rows),
            "expected": corpus.unique,
            "duplicate_keys": len(rows) - len(keys),
            "explicit_ids_missing": len(corpus.ids - set(ids)),
            "idless_stored": sum(1 for i in ids if i not in corpus.ids),
            "idless_expected": corpus.idless_unique,
            "integrity_check": conn.execute("PRAGMA integrity_check").fetchone()[0],
            "journal_batches": conn.execute("SELECT count(*) FROM load_journal").fetchone()[0],
        }
    finally:
        conn.close()
