"""``trialtwin compile-kernels``: fill Numba's cache with the engine's compiled kernels.

Run once after installing (``make setup`` does), so no request pays the compilation.
"""
from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compile-kernels", help="compile the engine's Numba kernels into the on-disk cache",
        description="Compile (or load from the cache) the PK core's and the population fit's Numba kernels, "
                    "so that the first simulation or fit after start-up does not spend its time compiling.")
    parser.add_argument("--json", action="store_true", help="print each kernel's report as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    from inference.kernels import compile_all

    report = compile_all()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    for name, info in report.items():
        if info.get("kernel") != "numba":
            print(f"{name}: numpy path (no compiled kernel)")
            continue
        cache = "cached on disk" if info.get("cache") else "NOT cached (cache directory not writable)"
        print(f"{name}: compiled kernel ready in {info['compile_seconds']:.1f} s, {cache}")
    return 0
