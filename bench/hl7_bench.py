"""HL7 v2 over MLLP: sustained ORU^R01 rate into the embedded store, nothing lost, against a baseline.

The listener is the real ``trialtwin listen-hl7`` in its own process; this process sends ORU^R01
messages (two OBX each: HbA1c in %, fasting glucose in mmol/L, converted to mg/dL on the way) over
``--connections`` MLLP connections, paced at ``--rate`` messages/s for ``--seconds``, and then checks
that every message got AA and that the store holds exactly one Observation per OBX sent.

Baseline, same run: the same messages' content stored as FHIR transaction Bundles (already mapped and
harmonized) straight into a SQLiteStore in this process, i.e. the cost of the writes alone, one
transaction per message, with no parsing, mapping, terminology, socket or ACK.

The listener's CPU per message (user + system of all its processes, from /proc) is recorded beside the
rate: on a shared machine the rate follows the other jobs' load, the CPU per message much less.
``--compare-ref REF`` runs the sustained test against the listener of git ref REF (the code before a
change) too, alternately with ours for ``--rounds`` rounds (ABBA order), and reports each one's median
run with all rounds beside it: on a shared machine one run each moved by ±30 % with the load.

Run: python bench/hl7_bench.py [--rate 1000 --seconds 10 --connections 16] [--compare-ref REF]
     -> prints, writes bench/results/hl7_bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import describe  # noqa: E402

from fhir_ops.connectors.hl7v2 import Hl7Ingest  # noqa: E402
from fhir_ops.connectors.mllp import MllpClient, frame  # noqa: E402
from fhir_ops.mapping import hl7v2  # noqa: E402
from fhir_ops.store.sqlite import SQLiteStore  # noqa: E402
from tests.fhir_ops.connectors.hl7_messages import adt, good_oru  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "hl7_bench.json"
N_PARTICIPANTS = 50


def messages(n: int, tag: str) -> list[str]:
    return [good_oru(f"{tag}{i}", f"TT201-{i % N_PARTICIPANTS + 1:03d}", hba1c=f"{6 + (i % 30) / 10:.1f}",
                     fpg_mmol=f"{5 + (i % 40) / 10:.1f}") for i in range(n)]


def register(store) -> None:
    ingest = Hl7Ingest(store)
    for i in range(N_PARTICIPANTS):
        ack = ingest.handle(adt(f"REG{i}", f"TT201-{i + 1:03d}"))
        assert "MSA|AA" in ack, ack


def baseline(n: int, tmp: str) -> dict:
    """The same content as direct FHIR transactions into the store (mapping done beforehand)."""
    store = SQLiteStore(os.path.join(tmp, "baseline", "trialtwin.sqlite"))
    register(store)
    ingest = Hl7Ingest(store)
    bundles = []
    for text in messages(n, "B"):
        mapped = hl7v2.to_bundle(hl7v2.parse(text), ingest.naming, ingest._find_patient)
        bundles.append(ingest._harmonize(mapped))
    t0 = time.perf_counter()
    for b in bundles:
        store.transaction(b)
    elapsed = time.perf_counter() - t0
    stored = store.search("Observation", [("_summary", "count")]).total
    store.close()
    return {"messages": n, "seconds": elapsed, "rate": n / elapsed, "observations": stored}


def start_listener(code: Path, data_dir: str, port: int, workers: int) -> subprocess.Popen:
    """``trialtwin listen-hl7`` of the code tree ``code`` on a fresh store with the participants registered."""
    store = SQLiteStore(os.path.join(data_dir, "trialtwin.sqlite"))
    register(store)
    store.close()
    proc = subprocess.Popen([sys.executable, "-m", "fhir_ops.cli", "listen-hl7", "--port", str(port),
                             "--data-dir", data_dir, "--workers", str(workers)], cwd=code,
                            env={**os.environ, "PYTHONPATH": str(code)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while "MLLP on" not in (line := proc.stdout.readline()):
        assert line, "the listener did not start"
    return proc


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the listener's worker processes), from /proc."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):  # children of any of its threads
        try:
            pids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_reference(ref: str, args, tmp: str) -> subprocess.Popen:
    """The listener of git ref ``ref`` (the code before a change) on port + 1, warmed up."""
    from store_bench import checkout

    code = checkout(ref, Path(tmp) / "ref-code")
    proc = start_listener(code, os.path.join(tmp, "ref-listener"), args.port + 1, args.workers)
    sustained(200, 1, args.connections, args.port + 1, "W")
    return proc


def measured(proc, args, port: int, tag: str) -> dict:
    """One sustained run against the listener ``proc`` with its CPU per message (all its processes)."""
    cpu0, own0 = tree_cpu_seconds(proc.pid), _own_cpu_seconds()
    run = sustained(args.rate, args.seconds, args.connections, port, tag)
    run["listener_cpu_us_per_message"] = 1e6 * (tree_cpu_seconds(proc.pid) - cpu0) / run["messages"]
    # the senders are this process's threads (nothing else runs here meanwhile): what they take of the cores
    run["sender_cpu_us_per_message"] = 1e6 * (_own_cpu_seconds() - own0) / run["messages"]
    return run


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def median_run(runs: list[dict]) -> dict:
    """The run with the median rate, with every run's rate and CPU per message beside it."""
    pick = dict(sorted(runs, key=lambda r: r["achieved_rate"])[len(runs) // 2])
    pick["rounds"] = [{"achieved_rate": r["achieved_rate"],
                       "listener_cpu_us_per_message": r["listener_cpu_us_per_message"],
                       "sender_cpu_us_per_message": r["sender_cpu_us_per_message"],
                       "load_average_1min": r["load_average_1min"], "answers": r["answers"]} for r in runs]
    return pick


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def sustained(rate: float, seconds: float, connections: int, port: int, tag: str, window: int = 1) -> dict:
    """Paced sending over ``connections`` connections; returns achieved rate, ACK latencies, answers.

    ``window`` > 1: each connection writes ``window`` messages at once and then reads their ACKs
    (pipelining); a message's latency runs from that write to its own ACK.
    """
    n = int(rate * seconds)
    texts = messages(n, tag)
    latencies: list[float] = []
    lags: list[float] = []  # how late each send was against the schedule: a listener that keeps pace keeps it ~0
    answers: dict[str, int] = {}
    lock = threading.Lock()
    load_before = os.getloadavg()[0]
    start = time.perf_counter() + 0.2

    def sender(k: int) -> None:
        local_lat, local_lag, local_ans = [], [], {}
        mine = list(range(k, n, connections))
        with MllpClient("127.0.0.1", port) as client:
            for b in range(0, len(mine), window):
                batch = mine[b:b + window]
                due = start + batch[0] / rate
                now = time.perf_counter()
                if due > now:
                    time.sleep(due - now)
                t = time.perf_counter()
                local_lag.append(max(0.0, t - due))
                client.sock.sendall(b"".join(frame(texts[i]) for i in batch))
                for _ in batch:
                    ack = client.receive()
                    local_lat.append(time.perf_counter() - t)
                    code = ack.split("MSA|", 1)[1][:2]
                    local_ans[code] = local_ans.get(code, 0) + 1
        with lock:
            latencies.extend(local_lat)
            lags.extend(local_lag)
            for c, v in local_ans.items():
                answers[c] = answers.get(c, 0) + v

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"target_rate": rate, "messages": n, "connections": connections, "window": window, "seconds": elapsed,
            "achieved_rate": n / elapsed, "answers": answers,
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
            "ack_latency_ms": {"p50": 1e3 * percentile(latencies, 0.5), "p99": 1e3 * percentile(latencies, 0.99),
                               "max": 1e3 * max(latencies)},
            "send_lag_behind_schedule_ms": {"p50": 1e3 * percentile(lags, 0.5), "p99": 1e3 * percentile(lags, 0.99),
                                            "max": 1e3 * max(lags)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--port", type=int, default=8161)
    parser.add_argument("--workers", type=int, default=2, help="listener processes (listen-hl7 --workers)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--baseline-messages", type=int, default=3000)
    parser.add_argument("--compare-ref", default=None,
                        help="git ref whose listener runs the same sustained test alternately with ours (port + 1)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="sustained runs of each listener (alternating with --compare-ref); the median is reported")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="hl7bench-")
    n = int(args.rate * args.seconds)
    base = baseline(min(n, args.baseline_messages), tmp)
    print(f"baseline: {base['rate']:.0f} FHIR transactions/s straight into the store ({base['messages']} messages)")

    data_dir = os.path.join(tmp, "listener")
    proc = start_listener(ROOT, data_dir, args.port, args.workers)
    ref_proc = start_reference(args.compare_ref, args, tmp) if args.compare_ref else None
    try:
        warm = sustained(200, 1, args.connections, args.port, "W")
        ours, theirs = [], []
        for i in range(args.rounds):
            # alternating which listener goes first (ABBA...), so a load that rises or falls over the
            # session does not favour one of them
            order = [(proc, args.port, ours, "M"), (ref_proc, args.port + 1, theirs, "R")][:: 1 if i % 2 == 0 else -1]
            for p, port, runs, tag in order:
                if p is not None:
                    runs.append(measured(p, args, port, f"{tag}{i}-"))
        run = median_run(ours)
        reference = median_run(theirs) if ref_proc else None
        unpaced = sustained(args.rate * 4, args.seconds / 2, args.connections, args.port, "X")
        # one connection, as many lab feeds use: each message waits for the previous one's ACK
        single = sustained(args.rate * 4, args.seconds / 2, 1, args.port, "S")
        # one connection pipelining 16 messages at a time (MLLP senders with a window)
        piped = sustained(args.rate * 4, args.seconds / 2, 1, args.port, "Y", window=16)
    finally:
        proc.terminate()
        listener_log, _ = proc.communicate(timeout=30)
        if ref_proc is not None:
            ref_proc.terminate()
            ref_proc.communicate(timeout=30)
    store = SQLiteStore(os.path.join(data_dir, "trialtwin.sqlite"))
    stored = store.search("Observation", [("_summary", "count")]).total
    store.close()
    if reference is not None:
        reference["ref"] = subprocess.run(["git", "rev-parse", args.compare_ref], cwd=ROOT, check=True,
                                          capture_output=True, text=True).stdout.strip()
    sent = (warm["messages"] + sum(r["messages"] for r in ours) + unpaced["messages"] + single["messages"]
            + piped["messages"])
    all_aa = all(set(r["answers"]) <= {"AA"} for r in (warm, *ours, unpaced, single, piped))
    commits = [line.split("group commits: ", 1)[1] for line in listener_log.splitlines() if "group commits: " in line]
    result = {
        "what": "ORU^R01 (2 OBX) over MLLP into the embedded store via trialtwin listen-hl7, one transaction "
                "and one ACK per message, vs the same content as direct FHIR transactions in-process",
        "machine": describe(("hl7", "orjson"), note="shared development VM (2 cores, ~8 engineers at work); the "
                            "listener and the senders share those cores"),
        "baseline_direct_transactions": base,
        "sustained": run, "unpaced_4x_target": unpaced, "one_connection": single, "one_connection_pipelined": piped,
        "listener_group_commits": commits,
        "messages_sent": sent, "observations_expected": 2 * sent, "observations_stored": stored,
        "nothing_lost": stored == 2 * sent and all_aa,
        "ratio_sustained_to_baseline": run["achieved_rate"] / base["rate"],
        "ratio_unpaced_to_baseline": unpaced["achieved_rate"] / base["rate"],
        **({"compare_ref_sustained": reference} if reference else {}),
    }
    print(f"sustained: target {args.rate:.0f}/s for {args.seconds:.0f} s -> {run['achieved_rate']:.0f} msg/s, "
          f"ACK p50 {run['ack_latency_ms']['p50']:.1f} ms p99 {run['ack_latency_ms']['p99']:.1f} ms, "
          f"answers {run['answers']}")
    lag = run["send_lag_behind_schedule_ms"]
    print(f"sends behind schedule: p50 {lag['p50']:.1f} ms, p99 {lag['p99']:.1f} ms, max {lag['max']:.1f} ms")
    print(f"listener CPU per message (all its processes, /proc): {run['listener_cpu_us_per_message']:.0f} us")
    print(f"senders' CPU per message (this process's threads): {run['sender_cpu_us_per_message']:.0f} us")
    if reference:
        print(f"{args.compare_ref} ({reference['ref'][:8]}), same test alternately: "
              f"{reference['achieved_rate']:.0f} msg/s, listener CPU {reference['listener_cpu_us_per_message']:.0f} us "
              f"per message, answers {reference['answers']}")
        for name, r in (("ours", run), (args.compare_ref, reference)):
            print(f"  rounds {name}: " + ", ".join(
                f"{x['achieved_rate']:.0f}/s {x['listener_cpu_us_per_message']:.0f} us" for x in r["rounds"]))
    print(f"unpaced (4x target offered): {unpaced['achieved_rate']:.0f} msg/s "
          f"({result['ratio_unpaced_to_baseline']:.2f}x the direct-transaction baseline)")
    print(f"one connection: {single['achieved_rate']:.0f} msg/s, ACK p50 {single['ack_latency_ms']['p50']:.1f} ms")
    print(f"one connection, 16 pipelined: {piped['achieved_rate']:.0f} msg/s, "
          f"ACK p50 {piped['ack_latency_ms']['p50']:.1f} ms")
    print(f"listener commits: {commits}")
    print(f"stored {stored} Observations for {sent} messages x 2 OBX: nothing lost = {result['nothing_lost']}")
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
