"""``Observation?_sort=-date&_count=10``: the sort plan before and after issue #11 (finding 7), same run.

The baseline is the earlier ORDER BY (the date subquery without ``INDEXED BY``), timed on the same
store; results go to ``bench/results/sort_plan_bench.json`` with the machine description.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import describe  # noqa: E402
from fhir_ops.search.query import compile_search, match_sql  # noqa: E402
from fhir_ops.store.sqlite import SQLiteStore  # noqa: E402


def _fill(store: SQLiteStore, n: int) -> None:
    entries = []
    for i in range(n):
        entries.append({"resource": {
            "resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/p{i % 200:03d}"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "effectiveDateTime": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:00Z",
            "valueQuantity": {"value": 7 + (i % 30) / 10, "system": "http://unitsofmeasure.org", "code": "%"}},
            "request": {"method": "POST", "url": "Observation"}})
    for start in range(0, n, 2000):
        store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries[start:start + 2000]})


def _time(store: SQLiteStore, order_by: str, where: str, args: list) -> float:
    with store._read() as conn:
        start = time.perf_counter()
        conn.execute(f"SELECT r.rid FROM resources r WHERE {where} ORDER BY {order_by} LIMIT 10", args).fetchall()
        return time.perf_counter() - start


def main() -> None:
    results = {}
    for n in (int(x) for x in os.environ.get("SORT_BENCH_SIZES", "1000,3000,12900").split(",")):
        store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "sort.sqlite"))
        _fill(store, n)
        c = compile_search("Observation", [("_sort", "-date"), ("_count", "10")])
        where, args, _, _ = match_sql(c)
        new = min(_time(store, c.order_by, where, args) for _ in range(3))
        row = {"observations": n, "indexed_plan_s": round(new, 4)}
        if n <= int(os.environ.get("SORT_BENCH_BASELINE_MAX", "3000")):  # the old plan is quadratic
            old = _time(store, c.order_by.replace(" INDEXED BY idx_date_r", ""), where, args)
            row.update(baseline_plan_s=round(old, 4), speedup=round(old / new, 1))
        results[str(n)] = row
        print(row, flush=True)
        store.close()
    out = {"benchmark": "sort_plan_bench", "machine": describe(), "results": results}
    path = Path(__file__).with_name("results") / "sort_plan_bench.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
