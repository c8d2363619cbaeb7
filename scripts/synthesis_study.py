#!/usr/bin/env python
"""Which synthetic calibration works: synthesis settings x whole-network compression, measured.

Each variant (`--variant samples=256,iterations=50,lr=0.1`: keyword arguments of
synthesize_calibration) synthesises inputs from a shipped checkpoint's BatchNorm statistics, then
compresses the whole network with each method + reconstruct on them and measures test accuracy.
Rows go to --results (one per variant x model x sparsity x method), which is read first so an
interrupted study resumes; docs/WHOLE.md's data-free section quotes them. Spell every setting out
(defaults change as the study finds better ones).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench import shipped_model  # noqa: E402
from torch_pruning_ext import compress, synthesize_calibration  # noqa: E402
from torch_pruning_ext.experiments.cli import OneLineParser, progress_bar, run_cli, sparsity  # noqa: E402
from torch_pruning_ext.experiments.data import dataset_info, load_split, normalize  # noqa: E402
from torch_pruning_ext.experiments.evaluation import accuracy  # noqa: E402
from torch_pruning_ext.experiments.results import read_rows, write_rows  # noqa: E402
from torch_pruning_ext.methods import METHODS  # noqa: E402

FIELDS = ["model", "variant", "sparsity", "method", "accuracy", "synthesis_seconds", "mismatch_start",
          "mismatch_end", "compress_seconds"]
SETTINGS = {"samples": int, "iterations": int, "lr": float, "batch_size": int, "jitter": int,
            "smoothness": float, "seed": int, "objective": str,
            "bfloat16": lambda text: text.lower() in ("1", "true")}


def row_key(row: dict) -> tuple:
    return row["model"], row["variant"], float(row["sparsity"]), row["method"]


def variant(text: str) -> dict:
    """'samples=256,iterations=50' -> {'samples': 256, 'iterations': 50}."""
    settings = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in SETTINGS or not value:
            raise argparse.ArgumentTypeError(f"bad variant item {item!r}: use key=value with keys {', '.join(SETTINGS)}")
        settings[key] = SETTINGS[key](value)
    return settings


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="synthesis_study.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--results", default="docs/results/whole/synthesis_study.csv", help="CSV the rows are merged into")
    add("--models", nargs="+", default=["vgg11_bn"], choices=["vgg11_bn", "resnet18"])
    add("--variant", dest="variants", action="append", type=variant, required=True)
    add("--sparsities", nargs="+", type=sparsity, default=[0.5])
    add("--methods", nargs="+", choices=list(METHODS), default=["fold"])
    return parser


def study(args) -> int:
    results = Path(args.results)
    done = {row_key(row) for row in read_rows(results)}
    info = dataset_info("fashion-mnist")
    test = load_split("fashion-mnist", "test")
    images = normalize(test.images, info)
    for name in args.models:
        model = shipped_model(name)
        for settings in args.variants:
            label = ",".join(f"{k}={v}" for k, v in settings.items())
            cells = [(s, m) for s in args.sparsities for m in args.methods
                     if row_key({"model": name, "variant": label, "sparsity": s, "method": m}) not in done]
            if not cells:
                continue
            options = dict(settings)
            samples = options.pop("samples", 256)
            with progress_bar(f"{name} {label}") as advance:
                inputs, report = synthesize_calibration(model, images[:1], samples, progress=advance, **options)
            for level, method in cells:
                started = time.perf_counter()
                small, _ = compress(model, images[:1], level, method, inputs, repair="reconstruct")
                seconds = time.perf_counter() - started
                row = {"model": name, "variant": label, "sparsity": level, "method": method,
                       "accuracy": round(100 * accuracy(small, images, test.labels), 2),
                       "synthesis_seconds": round(report.seconds, 1), "mismatch_start": round(report.loss_start, 4),
                       "mismatch_end": round(report.loss_end, 4), "compress_seconds": round(seconds, 1)}
                print(row, flush=True)
                write_rows(results, [row], key=row_key, first_fields=FIELDS)
    return 0


def main(argv=None) -> int:
    return run_cli("synthesis_study.py", study, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
