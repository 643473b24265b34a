"""The HL7 listener's store write, this code against an earlier revision, alternating, CPU per message.

On a shared 2-core machine the listener bench's rate follows the other jobs' load, so this isolates the
store write of ``Hl7Ingest``: the same ORU^R01 messages (two OBX, each a conditional create on its
message identifier, the resend check), parsed, mapped and harmonized beforehand, written as the
listener's writer does — ``--group`` messages merged into one store transaction — by this tree and by
the tree of ``--ref``, each in a fresh child process on a fresh store, alternating ABBA... for
``--rounds``; CPU seconds of the writing process per message, with the stage breakdown of the last
round of each code (the same stage timers as bench/hl7_profile.py would need, wrapped around store
functions by name). Writes bench/results/hl7_write_ab.json.

Run: python bench/hl7_write_ab.py [--ref 430bd18] [--messages 2000] [--group 8 --group 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _machine import describe  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "hl7_write_ab.json"

# One measurement, run in a child process whose sys.path starts with the code tree under test.
CHILD = r'''
import json, os, sys, tempfile, time, collections
code, bench, n, group = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path[:0] = [code, bench]
from hl7_bench import messages, register  # the tree's own bench script: it puts its own tree first
import fhir_ops
assert fhir_ops.__file__.startswith(code), fhir_ops.__file__
from fhir_ops.connectors.hl7v2 import Hl7Ingest
from fhir_ops.mapping import hl7v2
import fhir_ops.store.sqlite as S
store = S.SQLiteStore(os.path.join(tempfile.mkdtemp(prefix="hl7ab-"), "t.sqlite"))
register(store)
ingest = Hl7Ingest(store, group_commit=1)
texts = messages(2 * n, "A")
bundles = [ingest._harmonize(hl7v2.to_bundle(hl7v2.parse(t), ingest.naming, ingest._find_patient)) for t in texts]
spent = collections.defaultdict(float)
def timed(name, fn):
    def wrapper(*a, **k):
        t0 = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            spent[name] += time.process_time() - t0
    return wrapper
def write(bs):
    for i in range(0, len(bs), group):
        store.transaction({"resourceType": "Bundle", "type": "transaction",
                           "entry": [e for b in bs[i:i + group] for e in b["entry"]]})
write(bundles[:n])  # warm: caches, statement cache, a store of n messages already
t0 = time.process_time()
write(bundles[n:])
cpu = time.process_time() - t0
# the stage breakdown, on a second fresh store (the timers cost a little themselves)
store.close()
store = S.SQLiteStore(os.path.join(tempfile.mkdtemp(prefix="hl7ab-"), "t.sqlite"))
register(store)
for name in ("parse_entries", "validate_resource", "index_rows_many", "_dumps", "_stored", "response_entry"):
    setattr(S, name, timed(name, getattr(S, name)))
for name in ("search_ids", "resolve_conditions", "flush"):
    if hasattr(S._Tx, name):
        setattr(S._Tx, name, timed("_Tx." + name, getattr(S._Tx, name)))
write(bundles[:n])
spent.clear()
t1 = time.process_time()
write(bundles[n:])
total = time.process_time() - t1
stored = store.search("Observation", [("_summary", "count")]).total
print(json.dumps({"cpu_us_per_message": 1e6 * cpu / n, "observations_stored": stored,
                  "stages_us_per_message": {"total (timed run)": 1e6 * total / n,
                                            **{k: 1e6 * v / n for k, v in spent.items()}}}))
'''


def run(code: Path, n: int, group: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(code), str(code / "bench"), str(n), str(group)],
                         check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="430bd18", help="the earlier revision (git ref)")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--group", type=int, action="append", help="messages per commit (repeatable; default 8, 32)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    groups = args.group or [8, 32]
    from store_bench import checkout

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ref_code = checkout(args.ref, Path(tmp) / "ref")
        codes = {"this": ROOT, "ref": ref_code}
        per: dict = {g: {"this": [], "ref": []} for g in groups}
        last: dict = {g: {} for g in groups}
        for r in range(args.rounds):
            order = ["this", "ref"] if r % 2 == 0 else ["ref", "this"]
            for g in groups:
                for who in order:
                    res = run(codes[who], args.messages, g)
                    assert res["observations_stored"] == 4 * args.messages, res  # warm + timed, 2 OBX each
                    per[g][who].append(res["cpu_us_per_message"])
                    last[g][who] = res["stages_us_per_message"]
                    print(f"group {g:3d} {who:4s}: {res['cpu_us_per_message']:7.1f} us CPU per message")
    ref_sha = subprocess.run(["git", "rev-parse", args.ref], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.strip()
    this_sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    summary = {}
    for g in groups:
        this_m, ref_m = statistics.median(per[g]["this"]), statistics.median(per[g]["ref"])
        summary[f"group_{g}"] = {
            "this_us_per_message": [round(x, 1) for x in per[g]["this"]],
            "ref_us_per_message": [round(x, 1) for x in per[g]["ref"]],
            "median_this": round(this_m, 1), "median_ref": round(ref_m, 1),
            "ref_over_this": round(ref_m / this_m, 3),
            "stages_last_round_us_per_message": {k: {kk: round(vv, 1) for kk, vv in v.items()}
                                                 for k, v in last[g].items()}}
        print(f"group {g}: median {this_m:.0f} vs {ref_m:.0f} us CPU per message ({ref_m / this_m:.2f}x)")
    result = {
        "what": "CPU per HL7 message (ORU^R01, 2 OBX with their resend check) of the listener's store write, "
                "this tree vs an earlier revision, fresh process and store per measurement, alternating",
        "machine": describe(("orjson",), note=f"shared development VM (2 cores, ~8 engineers at work); load "
                            f"average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"),
        "this": this_sha, "ref": ref_sha, "messages_timed": args.messages, "rounds": args.rounds,
        "results": summary,
    }
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
