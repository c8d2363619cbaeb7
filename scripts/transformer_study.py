#!/usr/bin/env python
"""Whole-network compression of the trained small transformers, measured: docs/TRANSFORMERS.md's tables.

Models: vit_tiny (the small ViT trained on Fashion-MNIST by scripts/train.py --recipe vit) and
llama_bytes (the byte-level LLaMA trained on the fortunes corpus by scripts/train_lm.py). Each cell
compresses a copy with compress() and measures accuracy (10,000 test images) or validation perplexity,
parameters, MACs and latency. Scopes: mlp (MLP neurons only), heads (attention heads only),
mlp+heads, all (+ the residual width through every norm and embedding). Rows are merged into
--results as they finish, so an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import itertools
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from latency import measure  # noqa: E402
from torch_pruning_ext import compress, sample_calibration  # noqa: E402
from torch_pruning_ext.experiments.cli import OneLineParser, choice, progress_bar, run_cli, sparsity  # noqa: E402
from torch_pruning_ext.experiments.data import dataset_info, load_split, normalize  # noqa: E402
from torch_pruning_ext.experiments.evaluation import accuracy  # noqa: E402
from torch_pruning_ext.experiments.models import build_model  # noqa: E402
from torch_pruning_ext.experiments.results import read_rows, write_rows  # noqa: E402
from torch_pruning_ext.experiments.text import (build_language_model, consecutive_windows, load_corpus,  # noqa: E402
                                                perplexity, windows)
from torch_pruning_ext.compress import SCHEDULES  # noqa: E402
from torch_pruning_ext.methods import METHODS  # noqa: E402
from torch_pruning_ext.repair import REPAIR_MODES  # noqa: E402

MODELS = ("vit_tiny", "llama_bytes")
SCOPES = ("mlp", "heads", "mlp+heads", "all")
FIELDS = ["model", "sparsity", "scope", "schedule", "calibration", "method", "repair", "metric", "value", "params", "macs", "latency_ms",
          "fused_groups", "unfused_groups", "skipped_groups", "compress_seconds"]
VALIDATION_WINDOWS = 512  # held-out windows of 128 bytes (65,536 predicted bytes) per perplexity


def row_key(row: dict) -> tuple:
    return (row["model"], float(row["sparsity"]), row["scope"], row.get("schedule") or "uniform",
            row.get("calibration") or "data", row["method"], row["repair"])


class Subject:
    """A trained model with its example input, calibration inputs, metric and latency batch."""

    def __init__(self, name: str, checkpoint: Path, samples: int):
        if not checkpoint.is_file():
            command = ("python scripts/train.py --model-name vit_tiny --recipe vit --epochs 15 --output "
                       if name == "vit_tiny" else "python scripts/train_lm.py --output ")
            raise FileNotFoundError(f"no checkpoint {checkpoint}; train it with `{command}{checkpoint}`")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        self.name = name
        if name == "vit_tiny":
            self.model = build_model("vit_tiny", 10)
            self.model.load_state_dict(state["model_state_dict"])
            info = dataset_info("fashion-mnist")
            test = load_split("fashion-mnist", "test")
            self.test_images, self.test_labels = normalize(test.images, info), test.labels
            pool = load_split("fashion-mnist", "train")
            self.calibration = normalize(pool.images[:samples], info)
            self.example = self.test_images[:1]
            self.timing_input = self.test_images[:100]
            self.metric = "accuracy"
            self.embedding, self.mlp = "patch_embed", [f"blocks.{i}.mlp.fc1" for i in range(len(self.model.blocks))]
        else:
            self.model = build_language_model(state["config"])
            self.model.load_state_dict(state["model_state_dict"])
            train, validation = load_corpus()
            self.held_out = consecutive_windows(validation, limit=VALIDATION_WINDOWS)
            generator = torch.Generator().manual_seed(0)
            self.calibration = {"input_ids": windows(train, samples, generator=generator)[:, :-1]}
            self.example = {"input_ids": self.held_out[:1, :-1]}
            self.timing_input = {"input_ids": self.held_out[:8, :-1]}
            self.metric = "perplexity"
            layers = self.model.model.layers
            self.embedding = "model.embed_tokens"
            self.mlp = [f"model.layers.{i}.mlp.up_proj" for i in range(len(layers))]
        self.model.eval()

    def measure(self, model) -> float:
        if self.metric == "accuracy":
            return round(100 * accuracy(model, self.test_images, self.test_labels), 2)
        return round(perplexity(model, self.held_out), 4)

    @torch.inference_mode()
    def latency(self, model, repeats: int = 5) -> float:
        """Median milliseconds of one forward pass of the timing batch."""
        def run():
            return model(**self.timing_input) if isinstance(self.timing_input, dict) else model(self.timing_input)
        return round(measure(run, repeats, warmup=1)[0], 2)

    def scope(self, scope: str, level: float) -> dict:
        """compress() arguments that prune only `scope`: the residual width is kept by protecting the
        embedding (the group's first producer), the MLPs by protecting their first layers."""
        ignored = {"mlp": [self.embedding], "heads": [self.embedding] + self.mlp,
                   "mlp+heads": [self.embedding], "all": None}[scope]
        return {"ignored_layers": ignored, "head_sparsity": 0.0 if scope == "mlp" else level}


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="transformer_study.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", required=True, type=choice(MODELS, "model"))
    add("--checkpoint", default=None, help="default: runs/checkpoints/MODEL.checkpoint")
    add("--results", default=None, help="CSV the rows are merged into (default docs/results/transformers/MODEL.csv)")
    add("--sparsities", nargs="+", type=sparsity, default=[0.3, 0.5])
    add("--scopes", nargs="+", type=choice(SCOPES, "scope"), default=list(SCOPES))
    add("--schedule", type=choice(SCHEDULES, "schedule"), default="uniform",
        help="uniform: every group (and every block's heads) at the sparsity; global: ranked together")
    add("--methods", nargs="+", type=choice(METHODS, "method"), default=["default", "intra_fusion_fp", "fold"])
    # the data-free repair predicts statistics from BatchNorm, which these models do not have
    add("--repairs", nargs="+", type=choice(REPAIR_MODES, "repair"), default=["none", "reconstruct"])
    add("--calibration-samples", type=int, default=1024, help="unlabelled inputs for reconstruct")
    add("--calibration", type=choice(("data", "sampled"), "calibration"), default="data",
        help="data: held-out training inputs; sampled: text sampled from the language model itself (no data)")
    add("--table", action="store_true", help="print the results file as Markdown tables and exit")
    add("--retime", action="store_true",
        help="measure the latency of every architecture in the results file again (on an idle machine) and exit")
    return parser


def tables(rows: list[dict]) -> str:
    """Per sparsity: scope x method rows, the metric with each repair, then size, MACs and latency."""
    dense = next(row for row in rows if row["method"] == "dense")
    repairs = [r for r in ("none", "datafree", "reconstruct") if any(row["repair"] == r for row in rows)]
    lines = [f"Dense: {dense['metric']} {dense['value']}, {int(dense['params']):,} parameters, "
             f"{int(dense['macs']):,} MACs, {dense['latency_ms']} ms.", ""]
    for level in sorted({float(row["sparsity"]) for row in rows} - {0.0}):
        lines += [f"Sparsity {level}:", "", "| scope | method | " + " | ".join(repairs) + " | params | MACs | latency ms |",
                  "|---|---|" + "---:|" * (len(repairs) + 3)]
        cells = {(row["scope"], row.get("schedule") or "uniform", row.get("calibration") or "data", row["method"],
                  row["repair"]): row for row in rows if float(row["sparsity"]) == level}
        labels = [(scope, schedule, calibration) for scope in SCOPES for schedule in SCHEDULES
                  for calibration in ("data", "sampled")]
        for (scope, schedule, calibration), method in itertools.product(labels, ("default", "intra_fusion",
                                                                              "intra_fusion_fp", "fold")):
            present = [cells.get((scope, schedule, calibration, method, r)) for r in repairs]
            if not any(present):
                continue
            first = next(row for row in present if row)
            values = [row["value"] if row else "-" for row in present]
            label = scope + ("" if schedule == "uniform" else ", global") + \
                ("" if calibration == "data" else ", sampled text")
            lines.append(f"| {label} | {method} | " + " | ".join(map(str, values)) +
                         f" | {int(first['params']):,} | {int(first['macs']):,} | {first['latency_ms']} |")
        lines.append("")
    return "\n".join(lines)


def study(args) -> int:
    checkpoint = Path(args.checkpoint or ROOT / "runs" / "checkpoints" / f"{args.model}.checkpoint")
    results = Path(args.results or ROOT / "docs" / "results" / "transformers" / f"{args.model}.csv")
    if args.table:
        print(tables(read_rows(results)))
        return 0
    if args.calibration == "sampled" and args.model != "llama_bytes":
        raise ValueError(f"--calibration sampled needs the language model (--model llama_bytes), not {args.model}")
    done = {row_key(row) for row in read_rows(results)}
    subject = Subject(args.model, checkpoint, args.calibration_samples)
    if args.retime:
        return retime(subject, results)
    if args.calibration == "sampled":
        with progress_bar("sampling calibration text") as advance:
            subject.calibration, report = sample_calibration(subject.model, subject.example, args.calibration_samples,
                                                             progress=advance)
        print(f"sampled {report.sequences} x {report.length} tokens in {report.seconds:.0f} s", flush=True)
    base = {"model": args.model, "sparsity": 0.0, "scope": "-", "method": "dense", "repair": "none"}
    if row_key(base) not in done:
        _, dense = compress(subject.model, subject.example, 0.0, "default", repair="none")  # counts only
        write_rows(results, [base | {"metric": subject.metric, "value": subject.measure(subject.model),
                                     "params": dense.params_before, "macs": dense.macs_before,
                                     "latency_ms": subject.latency(subject.model)}], key=row_key, first_fields=FIELDS)
    cells = [(s, scope, m, r) for s in args.sparsities for scope in args.scopes for m in args.methods
             for r in args.repairs
             if not (m == "default" and r == "datafree")  # nothing merged: nothing for the data-free repair to do
             and not (args.calibration != "data" and r != "reconstruct")  # only reconstruct reads the calibration
             and row_key({"model": args.model, "sparsity": s, "scope": scope, "schedule": args.schedule,
                          "calibration": args.calibration, "method": m, "repair": r}) not in done]
    for number, (level, scope, method, repair) in enumerate(cells, 1):
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small, summary = compress(subject.model, subject.example, level, method,
                                      subject.calibration if repair == "reconstruct" else None, repair=repair,
                                      schedule=args.schedule, **subject.scope(scope, level))
        seconds = time.perf_counter() - started
        row = {"model": args.model, "sparsity": level, "scope": scope, "schedule": args.schedule,
               "calibration": args.calibration, "method": method, "repair": repair,
               "metric": subject.metric, "value": subject.measure(small), "params": summary.params_after,
               "macs": summary.macs_after, "latency_ms": subject.latency(small), "fused_groups": summary.fused_groups,
               "unfused_groups": len(summary.unfused_groups), "skipped_groups": len(summary.skipped_groups),
               "compress_seconds": round(seconds, 1)}
        write_rows(results, [row], key=row_key, first_fields=FIELDS)
        print(f"[{number}/{len(cells)}] s={level} {scope} {args.schedule} {method} {repair}: {subject.metric} {row['value']}, "
              f"params {summary.params_ratio:.2f}x, {seconds:.1f} s", flush=True)
    return 0


def retime(subject: Subject, results: Path) -> int:
    """Latency depends on the architecture only, not on the repair: one plainly pruned copy per
    (sparsity, scope, method) is timed and its latency written into every row of that architecture."""
    rows = read_rows(results)
    def architecture(row):
        schedule = row.get("schedule") or "uniform"
        # the global schedule spreads heads by their ranking, which uses the calibration when the row had it
        return row["sparsity"], row["scope"], schedule, row["method"], schedule == "global" and row["repair"] == "reconstruct"
    timed = {("0.0", "-", "uniform", "dense", False): subject.latency(subject.model)}
    for key in sorted({architecture(row) for row in rows} - set(timed)):
        level, scope, schedule, method, calibrated = key
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small, _ = compress(subject.model, subject.example, float(level), method,
                                subject.calibration if calibrated else None, repair="none",
                                schedule=schedule, **subject.scope(scope, float(level)))
        timed[key] = subject.latency(small)
        print(f"s={level} {scope} {schedule} {method}: {timed[key]} ms", flush=True)
    write_rows(results, [row | {"latency_ms": timed[architecture(row)]} for row in rows], key=row_key,
               first_fields=FIELDS)
    return 0


def main(argv=None) -> int:
    return run_cli("transformer_study.py", study, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
