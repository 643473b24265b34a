"""``trialtwin train <model>``: retrain a learned model reproducibly into the model registry.

A CLI hook (``add_parser(subparsers)`` / ``run(args)``) for ``fhir_ops.cli``; also runnable as a module.
"""
from __future__ import annotations

import argparse
import json
import sys

from inference.registry import DEFAULT_MODELS_DIR

__all__ = ["add_parser", "run", "main"]

MODELS = ("dropout", "withdrawal")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on an ``argparse`` subparsers object and return its parser.

    Examples
    --------
    >>> top = argparse.ArgumentParser(prog="trialtwin")
    >>> p = add_parser(top.add_subparsers(dest="command"))
    >>> args = top.parse_args(["train", "dropout", "--seed", "7", "--out", "/tmp/m"])
    >>> args.model, args.seed, args.out, args.handler is run
    ('dropout', 7, '/tmp/m', True)
    """
    parser = subparsers.add_parser("train", help="retrain a learned model (simulated data -> ONNX + metadata)",
                                   description="Retrain a learned model reproducibly and write it, its metadata, "
                                               "validation report and calibration plot to the model registry.")
    parser.add_argument("model", choices=MODELS, help="which model to train")
    parser.add_argument("--seed", type=int, default=None,
                        help="master seed (default: the committed model's own)")
    parser.add_argument("--out", default=str(DEFAULT_MODELS_DIR),
                        help="output directory (default: the package's inference/models)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train ``args.model`` with ``args.seed`` into ``args.out``; print a summary; return the exit status."""
    if args.model == "withdrawal":
        from inference.training.withdrawal import DEFAULT_SEED, train_withdrawal as train
    else:
        from inference.training.dropout import DEFAULT_SEED, train_dropout as train

    meta = train(args.out, seed=DEFAULT_SEED if args.seed is None else args.seed)
    v = meta["validation"]
    summary = {"model": f"{meta['name']}-{meta['version']}", "out": str(args.out), "sha256": meta["sha256"],
               "auc": round(v["auc"], 4), "brier": round(v["brier"], 4),
               "calibration_slope": round(v["calibration_slope"], 3),
               "calibration_intercept": round(v["calibration_intercept"], 3)}
    if "c_index" in v:
        summary["c_index"] = round(v["c_index"], 4)
    print(json.dumps(summary, indent=2))
    # the acceptance bar each model was committed under (docs/LEARNED_MODELS.md)
    ok = (v["auc"] >= 0.75 and 0.8 <= v["calibration_slope"] <= 1.2 if args.model == "dropout"
          else v["c_index"] >= 0.7 and 0.7 <= v["calibration_slope"] <= 1.3)
    if not ok:
        print(f"validation below the {args.model} model's acceptance bar", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m inference.cli_train dropout|withdrawal [--seed N] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="trialtwin")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv if argv[:1] == ["train"] else ["train", *argv])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
