"""Where an HL7 v2 result message's time goes in the listener, stage by stage, in one process.

Times each stage of ``Hl7Ingest`` for the bench's ORU^R01 messages (2 OBX): parsing (python-hl7's
full ``hl7.parse``, the former path, against the field splitter used now), mapping with the
participant lookup (from the store every time, as before, and cached), harmonization, the store
transaction (one per message, as before, and 32 messages per group commit) and the ACK; then a
cProfile of the whole ``handle`` path with the top functions by own time.

Run: python bench/hl7_profile.py [--messages 2000]  -> prints, writes bench/results/hl7_profile.json
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import hl7

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import describe  # noqa: E402
from hl7_bench import messages, register  # noqa: E402

from fhir_ops.connectors.hl7v2 import Hl7Ingest  # noqa: E402
from fhir_ops.mapping import hl7v2  # noqa: E402
from fhir_ops.store.sqlite import SQLiteStore  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "hl7_profile.json"


def per_message(fn, n: int) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return 1e6 * (time.perf_counter() - t0) / n, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    n = args.messages
    tmp = tempfile.mkdtemp(prefix="hl7profile-")
    store = SQLiteStore(os.path.join(tmp, "trialtwin.sqlite"))
    register(store)
    ingest = Hl7Ingest(store, group_commit=1)
    texts = messages(3 * n, "F")
    first, second, third = texts[:n], texts[n:2 * n], texts[2 * n:]
    stages = {}
    stages["parse: hl7.parse (python-hl7, former)"], _ = per_message(lambda: [hl7.parse(t) for t in first], n)
    stages["parse: field splitter (now)"], parsed = per_message(lambda: [hl7v2.parse(t) for t in first], n)

    def uncached(ident, current=True):
        return ingest._find_patient(ident, current=True)

    stages["map incl. participant lookup from the store (former)"], _ = per_message(
        lambda: [hl7v2.to_bundle(m, ingest.naming, uncached) for m in parsed], n)
    stages["map incl. participant lookup cached 1 s (now)"], mapped = per_message(
        lambda: [hl7v2.to_bundle(m, ingest.naming, ingest._find_patient) for m in parsed], n)
    stages["harmonize (terminology, cached harmonizer)"], bundles = per_message(
        lambda: [ingest._harmonize(m) for m in mapped], n)
    stages["ACK"], _ = per_message(lambda: [hl7v2.ack(m, "AA", "x") for m in parsed], n)
    stages["store: one transaction per message (former)"], _ = per_message(
        lambda: [store.transaction(b) for b in bundles], n)
    grouped = [ingest._harmonize(hl7v2.to_bundle(hl7v2.parse(t), ingest.naming, ingest._find_patient)) for t in second]

    def group_commit(size=32):
        for i in range(0, n, size):
            store.transaction({"resourceType": "Bundle", "type": "transaction",
                               "entry": [e for b in grouped[i:i + size] for e in b["entry"]]})

    stages["store: 32 messages per group commit (now, when messages arrive together)"], _ = per_message(group_commit, n)
    profile = cProfile.Profile()
    grouped_ingest = Hl7Ingest(store, group_commit=1)  # all in this thread, where cProfile looks
    t0 = time.perf_counter()
    profile.enable()
    for t in third:
        grouped_ingest.handle(t)
    profile.disable()
    handle_us = 1e6 * (time.perf_counter() - t0) / n
    grouped_ingest.close()
    stats = pstats.Stats(profile)
    total = stats.total_tt
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:20]
    own = [{"function": f"{Path(f).name}:{line}({name})", "own_s": round(tt, 4), "share": round(tt / total, 3),
            "calls": nc} for (f, line, name), (_, nc, tt, _, _) in top]
    stored = store.search("Observation", [("_summary", "count")]).total
    store.close()
    result = {
        "what": "per-message time of each stage of the HL7 v2 listener (ORU^R01, 2 OBX) in one process; "
                "former and current implementations measured in the same run",
        "machine": describe(("hl7", "orjson"), note="shared development VM (2 cores, ~8 engineers at work)"),
        "messages_per_stage": n, "us_per_message": {k: round(v, 1) for k, v in stages.items()},
        "handle_one_at_a_time_us_per_message_under_cprofile": round(handle_us, 1),
        "cprofile_top_own_time": own,
        "observations_stored": stored, "observations_expected": 2 * 3 * n,
    }
    for k, v in stages.items():
        print(f"{v:9.1f} us/msg  {k}")
    print("cProfile of Hl7Ingest.handle, top own time:")
    for row in own[:12]:
        print(f"  {100 * row['share']:5.1f} %  {row['function']}")
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
