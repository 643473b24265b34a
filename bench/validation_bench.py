"""Validation benchmark: resources/s of the compiled R4 validator against the former fhir.resources R4B
path (full pydantic model, and the shape-cached path the server used), on the demo study's resources.

The three validators run interleaved in the same process over the same resources, best of several
rounds each (the machine is shared, so the best round is the least disturbed); each round is a study
generated with another seed, so caches of values seen before (the compiled validator remembers strings
it accepted, the R4B path JSON shapes) only help as much as they would on new data.

Run: python bench/validation_bench.py [--participants 40] [--rounds 5]
     -> prints ratios, writes bench/results/validation_bench.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402
from fhir_ops.demo import build_demo_resources, simulate_demo_records  # noqa: E402
from fhir_ops.r4 import r4b_reference  # noqa: E402
from fhir_ops.r4.validator import compiled  # noqa: E402
from fhir_ops.validation import validate_resource  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "validation_bench.json"


def _rate(fn, resources: list[dict]) -> float:
    t0 = time.perf_counter()
    for r in resources:
        fn(r)
    return len(resources) / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    # every round validates a study generated with its own seed, so no validator sees a value twice
    # within a measurement; warm-up (imports, compiled tables, first shapes) uses yet another seed
    studies = [build_demo_resources(simulate_demo_records(seed, args.participants))
               for seed in range(11, 11 + args.rounds)]
    warmup = build_demo_resources(simulate_demo_records(7, args.participants))
    resources = studies[0]
    mix = collections.Counter(r["resourceType"] for r in resources)
    t0 = time.perf_counter()
    compiled.cache_clear()
    compiled()
    compile_s = time.perf_counter() - t0
    for r in warmup:  # every resource is valid on every path
        validate_resource(r)
        r4b_reference.validate_resource(r)
    contenders = {
        "r4_compiled": validate_resource,
        "r4b_shape_cached": r4b_reference.validate_resource,
        "r4b_full_model": r4b_reference.validate_resource_full,
    }
    best = {name: 0.0 for name in contenders}
    for study in studies:
        for name, fn in contenders.items():
            best[name] = max(best[name], _rate(fn, study))
    result = {
        "benchmark": "validation_bench",
        "what": "resources/s validating the demo study's resources (best of rounds, interleaved, one process; "
                "one freshly generated study per round)",
        "resources": len(resources),
        "resource_mix": dict(mix),
        "rounds": args.rounds,
        "compile_all_types_s": round(compile_s, 4),
        "resources_per_s": {k: round(v) for k, v in best.items()},
        "ratio_r4_compiled_vs_r4b_full_model": round(best["r4_compiled"] / best["r4b_full_model"], 2),
        "ratio_r4_compiled_vs_r4b_shape_cached": round(best["r4_compiled"] / best["r4b_shape_cached"], 2),
        "note": "baseline: the fhir.resources R4B path the server used before (full pydantic model validation, "
                "and its shape cache that skips the model for a JSON shape seen before); the compiled R4 "
                "validator also checks required bindings and R4 JSON rules the R4B path did not.",
        "machine": describe(("fhir.resources", "pydantic", "pydantic-core"),
                            note="shared 2-core development VM: other jobs ran concurrently; single-threaded"),
    }
    print(json.dumps({k: result[k] for k in ("resources", "compile_all_types_s", "resources_per_s",
                                              "ratio_r4_compiled_vs_r4b_full_model",
                                              "ratio_r4_compiled_vs_r4b_shape_cached")}, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
