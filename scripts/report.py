#!/usr/bin/env python
"""Turn sweep results into paper-style Markdown tables, per-table summaries and PNG plots."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from torch_pruning_ext.experiments.cli import OneLineParser, run_cli  # noqa: E402
from torch_pruning_ext.experiments.results import read_rows  # noqa: E402
from torch_pruning_ext.files import atomic_path, atomic_write_text  # noqa: E402
from torch_pruning_ext.repair import REPAIR_MODES  # noqa: E402

METHOD_ORDER = ["default", "intra_fusion", "intra_fusion_fp"]
LABELS = {"default": "default pruning", "intra_fusion": "Intra-Fusion",
          "intra_fusion_fp": "Intra-Fusion (function-preserving)", "base": "unpruned"}


DATA_SIZES = ("taylor_batches", "repair_samples", "thinet_samples")  # recorded only when not the default
NEEDED = ("model", "dataset", "criterion", "group", "sparsity", "method", "accuracy")


def variant(row) -> str:
    """The method name, extended by the repair mode, fine-tuning and non-default data sizes when a
    row used them, so that such rows get their own column instead of overwriting each other."""
    name = row["method"]
    if name == "base":
        return name
    if str(row.get("repair", "none")) not in ("none", "nan", ""):
        name += f"+repair_{row['repair']}"
    if float(row.get("finetune_epochs", 0) or 0) > 0:
        name += f"+finetune_{float(row['finetune_epochs']):g}"
    for size in DATA_SIZES:
        if str(row.get(size, "")) not in ("", "nan", "None"):
            name += f"+{size.replace('_', '-')}_{int(float(row[size]))}"
    return name


def label(method: str) -> str:
    """Readable name of a variant: "intra_fusion+repair_data+finetune_0.5+thinet-samples_64" ->
    "Intra-Fusion + repair data + fine-tuning 0.5 ep + thinet-samples 64"."""
    base, *extras = method.split("+")
    words = [LABELS.get(base, base)]
    for extra in extras:
        kind, _, value = extra.partition("_")
        words.append(f"fine-tuning {value} ep" if kind == "finetune" else f"{kind} {value.replace('_', ' ')}")
    return " + ".join(words)


def method_order(methods) -> list[str]:
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m.split("+")[0]) if m.split("+")[0] in METHOD_ORDER
                                          else len(METHOD_ORDER), m))


def read_results(path) -> pd.DataFrame:
    """The rows of one CSV or JSON results file (sweep.py, main.py --output); a file that holds none
    raises ValueError naming it."""
    rows = read_rows(path)
    missing = [c for c in NEEDED if c not in {key for row in rows for key in row}]
    if missing:
        raise ValueError(f"{path} is not a results file of this project (no {missing[0]!r} column)")
    if Path(path).suffix.lower() == ".json":
        frame = pd.DataFrame([row | {"group": "" if row.get("group") is None else str(row["group"])} for row in rows])
    else:
        frame = pd.read_csv(path, dtype={"group": str})
    try:
        frame[["sparsity", "accuracy"]] = frame[["sparsity", "accuracy"]].astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"results file {path} is corrupt (sparsity or accuracy is not a number)") from None
    return frame


def load(paths) -> pd.DataFrame:
    data = pd.concat([read_results(p) for p in paths], ignore_index=True)
    data["group"] = data["group"].fillna("")
    data["method"] = data.apply(variant, axis=1)
    data = data[~((data["method"] == "base") & data.duplicated(["model", "dataset", "criterion", "method"],
                                                                   keep="first"))]
    return data.drop_duplicates(subset=[c for c in data.columns if c not in ("accuracy", "prune_seconds")],
                                keep="last")


def single_group_cells(table: pd.DataFrame) -> pd.DataFrame:
    cells = table[(table["method"] != "base") & table["group"].str.fullmatch(r"\d+")].copy()
    cells["group"] = cells["group"].astype(int)
    return cells.pivot_table(index=["group", "sparsity"], columns="method", values="accuracy", aggfunc="last")


def select(data: pd.DataFrame, repairs=None, sparsities=None, criteria=None, finetune_epochs=None,
           methods=None) -> pd.DataFrame:
    """Rows of the given repair modes, sparsities, criteria, fine-tuning epochs and pruning methods
    (None: all); the unpruned "base" rows stay for every criterion kept."""
    chosen = pd.Series(True, index=data.index)
    if methods:
        chosen &= data["method"].str.split("+").str[0].isin(methods)
    if repairs:
        modes = data["repair"].fillna("none").astype(str) if "repair" in data.columns \
            else pd.Series("none", index=data.index)
        chosen &= modes.isin(repairs)
    if sparsities:
        chosen &= data["sparsity"].round(6).isin([round(s, 6) for s in sparsities])
    if finetune_epochs:
        epochs = data["finetune_epochs"].fillna(0).astype(float) if "finetune_epochs" in data.columns \
            else pd.Series(0.0, index=data.index)
        chosen &= epochs.round(6).isin([round(e, 6) for e in finetune_epochs])
    keep = (data["method"] == "base") | chosen
    if criteria:
        keep &= data["criterion"].isin(criteria)
    return data[keep]


def gap_to_base(pivot: pd.DataFrame, methods, base: float | None) -> str:
    """Mean accuracy drop from the unpruned model over the single-group cells, per method."""
    if base is None:
        return ""
    gaps = [f"{label(m)} {base - pivot[m].dropna().mean():.2f}" for m in methods
            if m in pivot.columns and pivot[m].notna().any()]
    return "- mean drop from the unpruned accuracy over these cells (points): " + "; ".join(gaps)


def markdown_table(pivot: pd.DataFrame, methods) -> str:
    sparsities = sorted(pivot.index.get_level_values("sparsity").unique())
    header = "| group | " + " | ".join(f"s={s:g}" for s in sparsities) + " |"
    lines = [header, "|" + "---|" * (len(sparsities) + 1)]
    for group in sorted(pivot.index.get_level_values("group").unique()):
        cells = []
        for s in sparsities:
            values = [pivot.loc[(group, s), m] if (group, s) in pivot.index and m in pivot.columns else np.nan
                      for m in methods]
            cells.append(" / ".join("-" if np.isnan(v) else f"{v:.2f}" for v in values))
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(pivot: pd.DataFrame, method: str) -> str:
    reference = "default" + method[len(method.split("+")[0]):]  # same repair/fine-tuning, no fusion
    if method not in pivot.columns or reference not in pivot.columns:
        return ""
    gain = (pivot[method] - pivot[reference]).dropna()
    if gain.empty:
        return ""
    worst, best = gain.idxmin(), gain.idxmax()
    return (f"- {label(method)} vs {label(reference)}: better in {int((gain > 0).sum())} of {len(gain)} cells, "
            f"worse in {int((gain < 0).sum())}; mean gain {gain.mean():+.2f} points, max {gain.max():+.2f} "
            f"(group {best[0]}, s={best[1]:g}); worst cell {gain.min():+.2f} (group {worst[0]}, s={worst[1]:g})")


def plot_curves(pivot: pd.DataFrame, methods, title: str, path: Path, base: float | None) -> None:
    groups = sorted(pivot.index.get_level_values("group").unique())
    columns = min(4, len(groups))
    rows = int(np.ceil(len(groups) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False, sharey=True)
    for axis, group in zip(axes.flat, groups):
        part = pivot.loc[group]
        for method in methods:
            if method in part.columns:
                axis.plot(part.index, part[method], marker="o", markersize=3, label=label(method),
                          linestyle="--" if "+" in method else "-")
        if base is not None:
            axis.axhline(base, color="gray", linestyle=":", linewidth=1)
        axis.set_title(f"group {group}", fontsize=9)
        axis.set_xlabel("sparsity", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(groups):]:
        axis.axis("off")
    axes[0, 0].set_ylabel("top-1 accuracy (%)")
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    _save(figure, path)


def plot_gain(pivot: pd.DataFrame, method: str, title: str, path: Path) -> None:
    gain = (pivot[method] - pivot["default"]).unstack("sparsity")
    figure, axis = plt.subplots(figsize=(1 + 0.8 * gain.shape[1], 0.9 + 0.4 * gain.shape[0]))
    limit = max(1e-9, np.nanmax(np.abs(gain.values)))
    image = axis.imshow(gain.values, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    axis.set_xticks(range(gain.shape[1]), [f"{s:g}" for s in gain.columns])
    axis.set_yticks(range(gain.shape[0]), [str(g) for g in gain.index])
    axis.set_xlabel("sparsity")
    axis.set_ylabel("group")
    for (i, j), value in np.ndenumerate(gain.values):
        if not np.isnan(value):
            axis.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axis, label="accuracy gain (points)")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    _save(figure, path)


def _save(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)


def whole_network_table(table: pd.DataFrame) -> str:
    whole = table[table["group"] == "all"]
    if whole.empty:
        return ""
    lines = ["| sparsity | method | params | MACs | accuracy |", "|---|---|---|---|---|"]
    for _, row in whole.sort_values(["sparsity", "method"]).iterrows():
        lines.append(f"| {row['sparsity']:g} | {label(row['method'])} | {int(row['params']):,} | {int(row['macs']):,} | "
                     f"{row['accuracy']:.2f} |")
    return "\n".join(lines)


def page_head(title: str, intro: str = "", commands=()) -> list[str]:
    """The opening lines of every generated page: title, findings (if any), the commands behind it."""
    parts = [f"# {title}", ""] + ([intro.strip(), ""] if intro.strip() else [])
    if commands:
        parts += ["Regenerate with:", "", "```", *commands, "```", ""]
    return parts


def report(data: pd.DataFrame, out_dir: Path, title: str, commands: list[str], prefix: str = "",
           intro: str = "") -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = page_head(title, intro, commands)
    for (model, dataset, criterion), table in data.groupby(["model", "dataset", "criterion"], sort=False):
        base_rows = table[table["method"] == "base"]
        base = float(base_rows["accuracy"].iloc[0]) if len(base_rows) else None
        parts.append(f"## {model} on {dataset}, {criterion} importance")
        parts.append("")
        if base is not None:
            parts += [f"Unpruned accuracy: {base:.2f}%.", ""]
        pivot = single_group_cells(table)
        if not pivot.empty:
            methods = method_order(pivot.columns)
            tuning = "" if any("+finetune" in m for m in methods) else ", no fine-tuning"
            parts += [f"Cells: {' / '.join(label(m) for m in methods)} (top-1 %, one group pruned{tuning}).", ""]
            parts += [markdown_table(pivot, methods), ""]
            parts += [line for line in (summary(pivot, m) for m in methods if not m.startswith("default")) if line]
            parts += [gap_to_base(pivot, methods, base), ""]
            stem = f"{prefix}{model}_{dataset}_{criterion}"
            plot_curves(pivot, methods, f"{model} / {dataset} / {criterion}", out_dir / f"{stem}_curves.png", base)
            parts.append(f"![accuracy vs sparsity]({stem}_curves.png)")
            for method in methods:
                if method in ("intra_fusion", "intra_fusion_fp") and "default" in pivot.columns:
                    plot_gain(pivot, method, f"{label(method)} minus default: {model} / {criterion}",
                              out_dir / f"{stem}_{method}_gain.png")
                    parts.append(f"![gain of {label(method)}]({stem}_{method}_gain.png)")
            parts.append("")
        whole = whole_network_table(table)
        if whole:
            parts += ["Whole network (every group at the same sparsity):", "", whole, ""]
    return "\n".join(parts) + "\n"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="report.py", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="CSV or JSON results files of sweeps or main.py --output")
    parser.add_argument("--out-dir", default="docs", help="where the Markdown file and PNGs go")
    parser.add_argument("--name", default="RESULTS.md", help="Markdown file name inside --out-dir")
    parser.add_argument("--title", default="Results")
    parser.add_argument("--command", action="append", default=[], help="command line to quote in the report")
    parser.add_argument("--repair", nargs="+", choices=REPAIR_MODES, default=None,
                        help="only rows of these repair modes (default: all)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None, help="only these sparsities")
    parser.add_argument("--criteria", nargs="+", default=None, help="only these importance criteria")
    parser.add_argument("--finetune-epochs", nargs="+", type=float, default=None,
                        help="only rows fine-tuned for these epochs (0: data-free rows)")
    parser.add_argument("--methods", nargs="+", choices=METHOD_ORDER, default=None,
                        help="only these pruning methods (default: all)")
    parser.add_argument("--plot-prefix", default="", help="prefix of the PNG file names (to keep reports apart)")
    parser.add_argument("--intro", default=None, help="Markdown file whose text follows the title (findings)")
    return parser


def write_report(args) -> int:
    missing = [p for p in args.results + ([args.intro] if args.intro else []) if not Path(p).is_file()]
    if missing:
        raise ValueError(f"no such file: {missing[0]}")
    out_dir = Path(args.out_dir)
    data = select(load(args.results), args.repair, args.sparsities, args.criteria, args.finetune_epochs,
                  args.methods)
    if not (data["method"] != "base").any():
        raise ValueError("no pruned rows match the filters (--repair, --sparsities, --criteria, "
                         "--finetune-epochs, --methods)")
    intro = Path(args.intro).read_text() if args.intro else ""
    text = report(data, out_dir, args.title, args.command, args.plot_prefix, intro)
    atomic_write_text(out_dir / args.name, text)
    print(f"wrote {out_dir / args.name}")
    return 0


def main(argv=None) -> int:
    return run_cli("report.py", write_report, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
