#!/usr/bin/env python
"""Accuracy vs memory footprint: structured pruning (sweep/main.py results) beside unstructured and
learned sparsity (train_sparse.py summaries), with the Pareto front, as Markdown + PNG."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from torch_pruning_ext.files import atomic_path, atomic_write_text  # noqa: E402
from report import label, page_head, variant  # noqa: E402


def structured_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the protocol: storage = dense fp32 bytes (structured pruning keeps weights dense)."""
    frame = frame.copy()
    frame["group"] = frame["group"].fillna("").astype(str)
    frame["family"] = pd.Series([label(variant(row)) for _, row in frame.iterrows()], index=frame.index,
                                dtype=object)
    frame.loc[frame["group"] == "all", "family"] += " (whole network)"
    criterion = frame["criterion"].astype(str) + " " if "criterion" in frame.columns else ""
    frame["label"] = criterion + "group " + frame["group"] + " s=" + frame["sparsity"].map("{:g}".format)
    frame.loc[frame["method"] == "base", "label"] = "unpruned"
    frame["storage_bytes"] = frame["dense_bytes"]
    return frame[["model", "family", "label", "accuracy", "storage_bytes", "peak_activation_bytes"]]


def unstructured_points(frame: pd.DataFrame) -> pd.DataFrame:
    """train_sparse.py rows: storage = the smaller of dense and CSR."""
    frame = frame.copy()
    frame["family"] = frame["method"]
    frame["label"] = frame["setting"]
    frame["storage_bytes"] = frame[["dense_bytes", "sparse_bytes"]].min(axis=1)
    return frame[["model", "family", "label", "accuracy", "storage_bytes", "peak_activation_bytes"]]


def pareto(points: pd.DataFrame) -> pd.DataFrame:
    """Points no other point beats on both smaller storage and higher accuracy."""
    ordered = points.sort_values(["storage_bytes", "accuracy"], ascending=[True, False])
    best, keep = -1.0, []
    for index, row in ordered.iterrows():
        if row["accuracy"] > best:
            keep.append(index)
            best = row["accuracy"]
    return points.loc[keep].sort_values("storage_bytes")


def plot(points: pd.DataFrame, front: pd.DataFrame, title: str, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for family, part in points.groupby("family"):
        axis.scatter(part["storage_bytes"] / 2**20, part["accuracy"], s=14, label=family, alpha=0.75)
    axis.plot(front["storage_bytes"] / 2**20, front["accuracy"], color="black", linewidth=1, label="Pareto front")
    axis.set_xscale("log")
    axis.set_xlabel("parameter storage (MiB; dense fp32, or CSR when smaller)")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structured", nargs="*", default=[], help="results.csv of sweeps / main.py")
    parser.add_argument("--unstructured", nargs="*", default=[], help="summary.csv of train_sparse.py")
    parser.add_argument("--out-dir", default="docs")
    parser.add_argument("--name", default="FOOTPRINT.md")
    parser.add_argument("--command", action="append", default=[])
    parser.add_argument("--intro", default=None, help="Markdown file whose text follows the title (the answer)")
    args = parser.parse_args(argv)
    missing = [p for p in args.structured + args.unstructured + ([args.intro] if args.intro else [])
               if not Path(p).is_file()]
    if missing or not (args.structured or args.unstructured):
        print(f"footprint_report.py: error: {'no such file: ' + missing[0] if missing else 'no input files'}",
              file=sys.stderr)
        return 2
    parts = [structured_points(pd.read_csv(p, dtype={"group": str})) for p in args.structured]
    parts += [unstructured_points(pd.read_csv(p)) for p in args.unstructured]
    points = pd.concat(parts, ignore_index=True).dropna(subset=["storage_bytes", "accuracy"])
    out = Path(args.out_dir)
    lines = page_head("Accuracy vs memory footprint", Path(args.intro).read_text() if args.intro else "", args.command)
    for model, part in points.groupby("model"):
        front = pareto(part)
        plot(part, front, f"{model}: accuracy vs parameter storage", out / f"footprint_{model}.png")
        lines += [f"## {model}", "", f"![accuracy vs footprint](footprint_{model}.png)", "",
                  "Pareto front (no other point is both smaller and more accurate):", "",
                  "| method | setting | accuracy | storage (MiB) | peak activation (KiB, batch 1) |",
                  "|---|---|---|---|---|"]
        for _, row in front.iterrows():
            lines.append(f"| {row['family']} | {row['label']} | {row['accuracy']:.2f} | "
                         f"{row['storage_bytes'] / 2**20:.2f} | {row['peak_activation_bytes'] / 2**10:.0f} |")
        lines.append("")
    atomic_write_text(out / args.name, "\n".join(lines) + "\n")
    print(f"wrote {out / args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
