"""Where the HL7 listener process's CPU goes under the bench's load: all threads, not one stage at a time.

``bench/hl7_profile.py`` times the stages of one message in one thread; this script profiles the
whole listener process (the accept loop, one thread per connection, the group-commit writer) while
``bench/hl7_bench.py``'s senders drive it: 16 connections, paced, over loopback. The listener runs in
its own process under yappi with the CPU clock (every thread, builtins included: socket calls,
SQLite, locks), and its functions' own CPU time is summed by where the code lives (store, mapping,
terminology, MLLP/sockets, threads and queues, logging...). The listener's CPU per message is also
read from /proc without the profiler (a second run on a fresh store), since a profiler inflates
cheap, frequent calls.

The "before" file was made by this script run in an export of the code before (``git archive d28c85d``,
this script copied in), right before the "after" run.

Run: python bench/hl7_listener_profile.py [--rate 600 --seconds 5] [--out NAME] [--no-profile]
     -> prints, writes bench/results/hl7_listener_profile[-NAME].json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import describe  # noqa: E402
from hl7_bench import register, sustained, tree_cpu_seconds  # noqa: E402

#: (category, path fragment) checked in order: the first fragment found in a function's file names it
CATEGORIES = [
    ("store: SQLite calls", "sqlite3"),
    ("store: validation", "fhir_ops/r4/"),
    ("store: validation", "fhir_ops/validation"),
    ("store: search index extraction", "fhir_ops/search/extract"),
    ("store: search index extraction", "fhir_ops/search/values"),
    ("store: conditions (resend check) and search compile", "fhir_ops/search/"),
    ("store: other (transaction, entries, JSON, ids)", "fhir_ops/store"),
    ("store: other (transaction, entries, JSON, ids)", "fhir_ops/json_codec"),
    ("store: other (transaction, entries, JSON, ids)", "uuid"),
    ("store: other (transaction, entries, JSON, ids)", "json/"),
    ("query and URL parsing (urllib, fhir_ops.urls)", "urllib/parse"),
    ("query and URL parsing (urllib, fhir_ops.urls)", "fhir_ops/urls"),
    ("JSON encode/decode", "orjson"),
    ("mapping (HL7 v2 -> FHIR)", "fhir_ops/mapping"),
    ("mapping (HL7 v2 -> FHIR)", "/hl7/parser"),
    ("terminology (harmonize, exact unit conversion)", "terminology/"),
    ("terminology (harmonize, exact unit conversion)", "fractions"),
    ("ingest glue (Hl7Ingest, GroupCommit)", "fhir_ops/connectors/hl7v2"),
    ("MLLP framing", "fhir_ops/connectors/mllp"),
    ("sockets (recv, sendall, accept, select)", "socket"),
    ("socketserver (accept loop, thread per connection)", "socketserver"),
    ("selectors", "selectors"),
    ("threads, locks, queues, futures", "threading"),
    ("threads, locks, queues, futures", "queue"),
    ("threads, locks, queues, futures", "concurrent/futures"),
    ("threads, locks, queues, futures", "_thread"),
    ("logging", "logging"),
    ("files read (terminology refresh each second)", "pathlib"),
]


def generic(module: str, name: str) -> bool:
    """A builtin that stands for no cost of its own (len, dict.get): folded into its caller."""
    return not any(fragment in f"{module} {name}" for fragment in ("sqlite3", "socket", "lock", "select", "poll"))


def category(module: str, name: str) -> str:
    text = f"{module} {name}"
    for label, fragment in CATEGORIES:
        if fragment in text:
            return label
    if "lock" in name:
        return "threads, locks, queues, futures"
    return "other: " + Path(module).name


def serve(data_dir: str, port: int, out: str, profile: bool) -> None:
    """Child: the listener as ``listen-hl7 --workers 1`` serves it, optionally under yappi (CPU clock)."""
    import logging

    from fhir_ops.commands import listen_hl7

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if profile:
        import yappi

        yappi.set_clock_type("cpu")
        yappi.set_context_name_callback(lambda: threading.current_thread().name)
        yappi.start(builtins=True, profile_threads=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    args = argparse.Namespace(host="127.0.0.1", port=port, data_dir=data_dir, url=None, token=None, workers=1)
    store = listen_hl7.open_store(args)
    from fhir_ops.connectors.hl7v2 import Hl7Ingest
    from fhir_ops.connectors.mllp import LOOPBACK, MllpServer

    ingest = Hl7Ingest(store)
    server = MllpServer(("127.0.0.1", port), ingest.handle, allow=LOOPBACK, handler_many=ingest.handle_many,
                        on_connection=ingest.connection)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"MLLP on {port}", flush=True)
    stop.wait()
    if not profile:
        server.shutdown()
        return
    yappi.stop()
    rows = []
    for s in yappi.get_func_stats():
        # a generic builtin's time (len, dict.get, str.split...) counts for the function that called it;
        # the builtins that name a cost of their own (SQLite, sockets, locks) stay rows of their own
        folded = 0.0 if s.builtin else sum(c.tsub for c in s.children if c.builtin and generic(c.module, c.name))
        rows.append({"function": f"{s.module}:{s.lineno}({s.name})" if s.lineno else f"{s.module}({s.name})",
                     "module": s.module, "name": s.name, "calls": s.ncall, "own_s": s.tsub, "total_s": s.ttot,
                     "builtin": bool(s.builtin), "generic": bool(s.builtin) and generic(s.module, s.name),
                     "own_with_builtins_s": s.tsub + folded})
    threads = [{"name": t.name, "cpu_s": t.ttot, "count": 1} for t in yappi.get_thread_stats()]
    Path(out).write_text(json.dumps({"functions": rows, "threads": threads, "writer": {
        "commits": ingest.writer.commits, "messages": ingest.writer.messages}}))
    server.shutdown()


def start(data_dir: str, port: int, out: str, profile: bool) -> subprocess.Popen:
    from fhir_ops.store.sqlite import SQLiteStore

    store = SQLiteStore(os.path.join(data_dir, "trialtwin.sqlite"))
    register(store)
    store.close()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", data_dir, str(port), out]
                            + (["--profile"] if profile else []),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while "MLLP on" not in (line := proc.stdout.readline()):
        assert line, "the listener did not start"
    return proc


def user_system(pid: int) -> tuple[float, float]:
    """User and system (kernel: sockets, futex wake-ups, fsync) CPU seconds of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all of a process's threads (futex waits, GIL hand-offs)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total


def drive(proc, args, tag: str) -> dict:
    sustained(200, 1, args.connections, args.port, "W" + tag)
    cpu0, (u0, s0), cs0 = tree_cpu_seconds(proc.pid), user_system(proc.pid), context_switches(proc.pid)
    run = sustained(args.rate, args.seconds, args.connections, args.port, tag)
    run["listener_cpu_us_per_message"] = 1e6 * (tree_cpu_seconds(proc.pid) - cpu0) / run["messages"]
    u1, s1 = user_system(proc.pid)
    # threads that ended during the run (none: connections stay open) would drop out of the count
    run["listener_context_switches_per_message"] = round((context_switches(proc.pid) - cs0) / run["messages"], 1)
    run["listener_user_system_us_per_message"] = [round(1e6 * (u1 - u0) / run["messages"], 1),
                                                  round(1e6 * (s1 - s0) / run["messages"], 1)]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    return run


def summarize(data: dict, n: int, top: int) -> dict:
    """By category, top functions and threads, per message, from the profiled listener's dump."""
    funcs = [f for f in data["functions"] if not f["generic"]]
    for f in funcs:
        f["own_s"] = f["own_with_builtins_s"]
    total = sum(f["own_s"] for f in funcs)
    by_cat: dict[str, float] = {}
    for f in funcs:
        c = category(f["module"], f["name"])
        by_cat[c] = by_cat.get(c, 0.0) + f["own_s"]
    members: dict[str, list] = {}
    for f in sorted(funcs, key=lambda f: -f["own_s"]):
        members.setdefault(category(f["module"], f["name"]), []).append(
            f"{f['function'].replace(str(ROOT) + '/', '')}: {1e6 * f['own_s'] / n:.1f} us, {f['calls'] / n:.2f} calls")
    cats = [{"category": c, "us_per_message": round(1e6 * s / n, 1), "share": round(s / total, 3),
             "top_functions": members[c][:5]}
            for c, s in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    top_rows = [{"function": f["function"].replace(str(ROOT) + "/", ""), "calls_per_message": round(f["calls"] / n, 2),
                 "own_us_per_message": round(1e6 * f["own_s"] / n, 1), "share": round(f["own_s"] / total, 3)}
                for f in sorted(funcs, key=lambda f: -f["own_s"])[:top]]
    threads: dict[str, float] = {}
    for t in data["threads"]:
        kind = "connections (one thread each)" if t["name"].startswith("Thread-") else t["name"]
        threads[kind] = threads.get(kind, 0.0) + t["cpu_s"]
    return {"total_s": total, "by_category": cats, "top_own_time": top_rows,
            "threads_cpu_us_per_message": {k: round(1e6 * v / n, 1)
                                           for k, v in sorted(threads.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--resummarize":
        resummarize(*sys.argv[2:5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], "--profile" in sys.argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=600,
                        help="paced messages/s (below what the profiled listener takes)")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--port", type=int, default=8372)
    parser.add_argument("--out", default="", help="suffix of the result file (e.g. before / after)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--no-profile", action="store_true", help="only the unprofiled run (CPU, context switches)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="hl7lprof-")
    plain = drive(start(os.path.join(tmp, "plain"), args.port, "", False), args, "P")
    print(f"unprofiled: {plain['achieved_rate']:.0f} msg/s, "
          f"listener CPU {plain['listener_cpu_us_per_message']:.0f} us/msg "
          f"(user, system: {plain['listener_user_system_us_per_message']}), "
          f"{plain['listener_context_switches_per_message']} context switches/msg", flush=True)
    if args.no_profile:
        return
    dump = os.path.join(tmp, "profile.json")
    profiled = drive(start(os.path.join(tmp, "profiled"), args.port, dump, True), args, "Q")
    data = json.loads(Path(dump).read_text())
    n = profiled["messages"] + 200  # the warm-up's messages were profiled too
    summary = summarize(data, n, args.top)
    result = {
        "what": "CPU of the whole HL7 listener process (all threads, yappi CPU clock, builtins included) under "
                "hl7_bench's load (ORU^R01 with 2 OBX, paced, loopback), summed by where the code lives; and "
                "the listener's CPU per message from /proc without the profiler",
        "machine": describe(("hl7", "orjson", "yappi"), note="shared development VM (2 cores, ~8 engineers at work)"),
        "load": {"rate": args.rate, "seconds": args.seconds, "connections": args.connections},
        "unprofiled": {"achieved_rate": plain["achieved_rate"], "answers": plain["answers"],
                       "listener_cpu_us_per_message": round(plain["listener_cpu_us_per_message"], 1),
                       "listener_user_system_us_per_message": plain["listener_user_system_us_per_message"],
                       "listener_context_switches_per_message": plain["listener_context_switches_per_message"],
                       "load_average_1min": plain["load_average_1min"]},
        "profiled": {"achieved_rate": profiled["achieved_rate"], "answers": profiled["answers"],
                     "listener_cpu_us_per_message": round(profiled["listener_cpu_us_per_message"], 1),
                     "profiled_cpu_us_per_message": round(1e6 * summary.pop("total_s") / n, 1),
                     "group_commits": data["writer"]},
        "profiled_messages": n,
        **summary,
    }
    print(f"profiled: {profiled['achieved_rate']:.0f} msg/s, profiled CPU "
          f"{result['profiled']['profiled_cpu_us_per_message']:.0f} us/msg, commits {data['writer']}")
    report(result)
    if not args.no_write:
        path = ROOT / "bench" / "results" / f"hl7_listener_profile{'-' + args.out if args.out else ''}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


def report(result: dict) -> None:
    print("threads:", result["threads_cpu_us_per_message"])
    for c in result["by_category"]:
        print(f"  {c['us_per_message']:8.1f} us  {100 * c['share']:5.1f} %  {c['category']}")
    for r in result["top_own_time"][:20]:
        print(f"  {r['own_us_per_message']:8.1f} us  {r['calls_per_message']:7.2f}x  {r['function']}")


def resummarize(dump: str, path: str, root: str) -> None:
    """Recompute the categories of a result file from its run's dump (the categories changed, the run did not)."""
    global ROOT
    result = json.loads(Path(path).read_text())
    ROOT = Path(root)
    summary = summarize(json.loads(Path(dump).read_text()), result["profiled_messages"], len(result["top_own_time"]))
    summary.pop("total_s")
    result.update(summary)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    report(result)


if __name__ == "__main__":
    main()
