#!/usr/bin/env python
"""docs/WHOLE.md: whole-network compression, every method x repair, with size, MACs, CPU latency and a plot.

Reads the rows of sweeps run with `--groups whole` (and fine-tuned rows as the reference point);
latency is measured once per pruned architecture from the models the sweep saved (--save-pruned)
and kept in a CSV, so the page can be regenerated without timing again.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from latency import measure  # noqa: E402
from report import LABELS, _save, page_head  # noqa: E402
from torch_pruning_ext.files import atomic_write_text  # noqa: E402
from torch_pruning_ext.experiments.models import build_model  # noqa: E402
from torch_pruning_ext.experiments.protocol import Settings, pruned_file_name  # noqa: E402
from torch_pruning_ext.serialization import load_pruned  # noqa: E402

METHODS = ["default", "intra_fusion", "intra_fusion_fp", "fold"]
REPAIRS = ["none", "datafree", "variance", "data", "data_downstream", "reconstruct", "data, 256 synthetic",
           "data, 1024 synthetic", "reconstruct, 256 synthetic", "reconstruct, 1024 synthetic"]
# (the "synthetic" ones: no data at all, --calibration synthetic)
LABELS = LABELS | {"fold": "Model Folding (k-means)"}
SHAPE_KEYS = ["model", "sparsity", "schedule", "max_layer_sparsity"]  # what fixes a pruned architecture
LATENCY_FIELDS = SHAPE_KEYS + ["batch", "median_ms", "p10_ms", "p90_ms"]
MARKERS = {"default": "o", "intra_fusion": "s", "intra_fusion_fp": "D", "fold": "^", "finetune": "*"}
COLOURS = {"none": "#7f7f7f", "datafree": "#9467bd", "variance": "#ff7f0e", "data": "#1f77b4",
           "data_downstream": "#17becf", "reconstruct": "#d62728", "data, 256 synthetic": "#bcbd22",
           "data, 1024 synthetic": "#aec7e8",
           "reconstruct, 256 synthetic": "#e377c2",
           "reconstruct, 1024 synthetic": "#8c564b", "finetune": "#2ca02c"}
SPREAD = 0.05  # horizontal offset between methods (log scale), so markers at one MACs value stay visible


def load(paths) -> pd.DataFrame:
    data = pd.concat([pd.read_csv(p, dtype={"group": str}) for p in paths], ignore_index=True)
    for column, default in (("repair", "none"), ("schedule", "uniform"), ("finetune_epochs", 0.0),
                            ("max_layer_sparsity", ""), ("calibration", ""), ("repair_samples", "")):
        if column not in data.columns:
            data[column] = default
    data["repair"] = data["repair"].fillna("none")
    # a repair on synthesised inputs is its own column: "reconstruct, 1024 synthetic"
    synthetic = data["calibration"].fillna("") == "synthetic"
    samples = data["repair_samples"].map(lambda v: "1024" if pd.isna(v) or v == "" else f"{int(float(v))}")
    data.loc[synthetic, "repair"] = data.loc[synthetic, "repair"] + ", " + samples[synthetic] + " synthetic"
    data["schedule"] = data["schedule"].fillna("uniform")
    data["max_layer_sparsity"] = data["max_layer_sparsity"].map(lambda v: "" if pd.isna(v) or v == "" else f"{float(v):g}")
    data["finetune_epochs"] = data["finetune_epochs"].fillna(0.0).astype(float)
    whole = data[(data["group"] == "all") | (data["method"] == "base")]
    whole = whole[whole["criterion"] == "l1"]
    return whole.drop_duplicates(subset=["model", "sparsity", "method", "repair", "schedule", "max_layer_sparsity",
                                         "finetune_epochs"], keep="last")


def shape_key(row) -> tuple:
    return (row["model"], round(float(row["sparsity"]), 6), row["schedule"], str(row["max_layer_sparsity"]))


def measure_latency(data: pd.DataFrame, pruned_dir: Path, batches, repeats: int) -> list[dict]:
    """Median CPU latency (eager PyTorch, inference mode) of one saved model per pruned architecture."""
    rows = []
    cells = data[(data["method"] == "default") & (data["finetune_epochs"] == 0)
                 & (data["calibration"].fillna("") != "synthetic")].drop_duplicates(subset=SHAPE_KEYS)
    for _, row in cells.iterrows():
        cap = float(row["max_layer_sparsity"]) if row["max_layer_sparsity"] else None
        settings = Settings(row["model"], row["dataset"], "l1", repair=row["repair"],
                            schedule=None if row["schedule"] == "uniform" else row["schedule"],
                            max_layer_sparsity=cap)
        path = pruned_dir / pruned_file_name(settings, "all", float(row["sparsity"]), "default")
        if not path.is_file():
            raise ValueError(f"no saved model {path}: run the sweep with --save-pruned {pruned_dir}")
        rows += _time_model(load_pruned(path), row, batches, repeats)
    for name in data[data["method"] == "base"]["model"].unique():
        base = {"model": name, "sparsity": 0.0, "schedule": "uniform", "max_layer_sparsity": ""}
        rows += _time_model(build_model(name, 10).eval(), base, batches, repeats)
    return rows


def _time_model(model, row, batches, repeats) -> list[dict]:
    out = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            median, low, high = measure(lambda: model(x), repeats, 3)
        out.append({**{k: row[k] for k in SHAPE_KEYS}, "batch": batch, "median_ms": round(median, 3),
                    "p10_ms": round(low, 3), "p90_ms": round(high, 3)})
    return out


def latency_table(path: Path) -> dict:
    if not path.is_file():
        return {}
    table = {}
    for row in csv.DictReader(io.StringIO(path.read_text())):
        key = (row["model"], round(float(row["sparsity"]), 6), row["schedule"], row["max_layer_sparsity"])
        table.setdefault(key, {})[int(row["batch"])] = float(row["median_ms"])
    return table


def variant_label(schedule: str, cap: str) -> str:
    return "uniform" if schedule == "uniform" else f"{schedule}, at most {float(cap):g} per group" if cap else schedule


def best_within(table: pd.DataFrame, base: float, points: float):
    """The row with the fewest MACs within `points` of the unpruned accuracy (no fine-tuning)."""
    close = table[(table["method"] != "base") & (table["finetune_epochs"] == 0) & (table["accuracy"] >= base - points)]
    return None if close.empty else close.sort_values(["macs", "accuracy"], ascending=[True, False]).iloc[0]


def model_section(name: str, table: pd.DataFrame, latency: dict) -> list[str]:
    base = float(table[table["method"] == "base"]["accuracy"].iloc[0])
    base_params = int(table[table["method"] == "base"]["params"].iloc[0])
    base_macs = int(table[table["method"] == "base"]["macs"].iloc[0])
    base_latency = latency.get((name, 0.0, "uniform", ""), {})
    parts = [f"## {name}", "", f"Unpruned: {base:.2f}%, {base_params / 1e6:.2f} M parameters, {base_macs / 1e6:.1f} M MACs"
             + (f", {base_latency.get(1, float('nan')):.2f} ms (batch 1) / {base_latency.get(128, float('nan')):.1f} ms "
                "(batch 128)." if base_latency else "."), ""]
    for points in (0.5, 1.0, 2.0):
        best = best_within(table, base, points)
        if best is not None:
            parts.append(f"- smallest model within {points:g} point{'s' if points != 1 else ''} of the unpruned accuracy: "
                         f"{LABELS.get(best['method'], best['method'])} + repair {best['repair']}, s={best['sparsity']:g} "
                         f"({variant_label(best['schedule'], best['max_layer_sparsity'])}): {best['accuracy']:.2f}% at "
                         f"{best['params'] / 1e6:.2f} M parameters ({100 * best['params'] / base_params:.0f}%) and "
                         f"{best['macs'] / 1e6:.1f} M MACs ({100 * best['macs'] / base_macs:.0f}%)")
    parts.append("")
    pruned = table[(table["method"] != "base") & (table["finetune_epochs"] == 0)]
    blocks = sorted(pruned.groupby(["sparsity", "schedule", "max_layer_sparsity"]),
                    key=lambda item: (item[0][1] != "uniform", item[0][0]))  # uniform first, as the paper
    for (sparsity, schedule, cap), cells in blocks:
        row = cells.iloc[0]
        times = latency.get(shape_key(row), {})
        timing = (f", CPU latency {times[1]:.2f} ms (batch 1) / {times[128]:.1f} ms (batch 128)"
                  if 1 in times and 128 in times else "")
        parts += [f"### s={sparsity:g}, {variant_label(schedule, cap)}: {row['params'] / 1e6:.2f} M parameters "
                  f"({100 * row['params'] / base_params:.0f}%), {row['macs'] / 1e6:.1f} M MACs "
                  f"({100 * row['macs'] / base_macs:.0f}%){timing}", ""]
        repairs = [r for r in REPAIRS if r in set(cells["repair"])] + sorted(set(cells["repair"]) - set(REPAIRS))
        parts += ["| method | " + " | ".join(f"repair {r}" for r in repairs) + " |", "|---|" + "---|" * len(repairs)]
        for method in [m for m in METHODS if m in set(cells["method"])]:
            values = []
            for repair in repairs:
                hit = cells[(cells["method"] == method) & (cells["repair"] == repair)]
                values.append("-" if hit.empty else f"{float(hit['accuracy'].iloc[0]):.2f}")
            parts.append(f"| {LABELS.get(method, method)} | " + " | ".join(values) + " |")
        parts.append("")
    tuned = table[table["finetune_epochs"] > 0]
    if not tuned.empty:
        parts += ["Reference point, fine-tuned (SGD on the training set, no repair):", ""]
        parts += [f"- {LABELS.get(r['method'], r['method'])}, s={r['sparsity']:g}, {r['finetune_epochs']:g} epoch: "
                  f"{r['accuracy']:.2f}%" for _, r in tuned.sort_values(["sparsity", "method"]).iterrows()]
        parts.append("")
    return parts


def plot(data: pd.DataFrame, path: Path) -> None:
    models = list(data["model"].unique())
    figure, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models) + 2.6, 4.2), squeeze=False)
    for axis, name in zip(axes[0], models):
        table = data[data["model"] == name]
        base = table[table["method"] == "base"].iloc[0]
        axis.axhline(base["accuracy"], color="black", linestyle=":", linewidth=1)
        axis.scatter([base["macs"] / 1e6], [base["accuracy"]], marker="P", s=80, color="black", zorder=3)
        for _, row in table[table["method"] != "base"].iterrows():
            kind = "finetune" if row["finetune_epochs"] > 0 else row["repair"]
            marker = MARKERS["finetune"] if row["finetune_epochs"] > 0 else MARKERS.get(row["method"], "x")
            hollow = row["schedule"] != "uniform"
            offset = np.exp(SPREAD * (METHODS.index(row["method"]) - 1.5)) if row["method"] in METHODS else 1.0
            axis.scatter([row["macs"] / 1e6 * offset], [row["accuracy"]], marker=marker, s=36, zorder=2,
                         facecolors="none" if hollow else COLOURS.get(kind, "gray"),
                         edgecolors=COLOURS.get(kind, "gray"), linewidths=1.2)
        axis.set_xscale("log")
        ticks = sorted({round(v / 1e6, 1) for v in table["macs"]})
        axis.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xlabel("MACs (millions, log scale)")
        axis.set_ylabel("top-1 accuracy (%)")
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3, which="both")
        axis.set_title(f"{name}: whole network, no fine-tuning unless marked")
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=f"repair {k}" if k != "finetune"
                          else "fine-tuned 0.5 epoch") for k, c in COLOURS.items()]
    handles += [plt.Line2D([], [], color="black", marker=m, markerfacecolor="white", linestyle="",
                           label=LABELS.get(k, k)) for k, m in MARKERS.items() if k != "finetune"]
    handles += [plt.Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="",
                           label="hollow: global schedule"),
                plt.Line2D([], [], color="black", marker="P", linestyle="", label="unpruned")]
    figure.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1 - 2.4 / (5.2 * len(models) + 2.6), 1))
    _save(figure, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.csv files (whole-network rows are used)")
    parser.add_argument("--out-dir", default="docs")
    parser.add_argument("--name", default="WHOLE.md")
    parser.add_argument("--latency", default=None, help="CSV of latency measurements (read, or written by --measure)")
    parser.add_argument("--measure", default=None, metavar="PRUNED_DIR",
                        help="time one saved model per architecture from this --save-pruned folder into --latency")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="only these sparsities")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--intro", default=None, help="Markdown file whose text follows the title (findings)")
    parser.add_argument("--command", action="append", default=[], help="command line to quote in the report")
    args = parser.parse_args(argv)
    missing = [p for p in args.results + ([args.intro] if args.intro else []) if not Path(p).is_file()]
    if missing:
        print(f"whole_report.py: error: no such file: {missing[0]}", file=sys.stderr)
        return 2
    if args.measure and not args.latency:
        print("whole_report.py: error: --measure needs --latency FILE to write to", file=sys.stderr)
        return 2
    data = load(args.results)
    data = data[(data["method"] == "base") | data["sparsity"].round(6).isin([round(v, 6) for v in args.sparsities])]
    if args.measure:
        rows = measure_latency(data, Path(args.measure), (1, 128), args.repeats)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LATENCY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(args.latency, buffer.getvalue())
    latency = latency_table(Path(args.latency)) if args.latency else {}
    out_dir = Path(args.out_dir)
    parts = page_head("Whole-network compression", Path(args.intro).read_text() if args.intro else "", args.command)
    plot(data, out_dir / "whole_accuracy_macs.png")
    parts += ["![accuracy against MACs](whole_accuracy_macs.png)", ""]
    for name in data["model"].unique():
        parts += model_section(name, data[data["model"] == name], latency)
    atomic_write_text(out_dir / args.name, "\n".join(parts) + "\n")
    print(f"wrote {out_dir / args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
