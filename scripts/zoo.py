#!/usr/bin/env python
"""Whole-network pruning of torchvision models nobody here wrote: docs/ZOO.md and its CSV.

Random weights with randomised BatchNorm statistics (as a trained model has), BatchNorm left
unfolded (it is fused along the map). For each family: whole network at --sparsity with default
pruning and with Intra-Fusion (function-preserving rule); parameters against torch-pruning's own
MetaPruner at the same ratio; which groups fuse, which fall back and why; seconds per run.
"""
from __future__ import annotations

import copy
import csv
import io
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch_pruning as tp
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from torch_pruning_ext import IntraFusionPruner, OptimalTransport  # noqa: E402
from torch_pruning_ext.experiments.cli import OneLineParser, run_cli  # noqa: E402
from torch_pruning_ext.experiments.models import randomize_batchnorms  # noqa: E402
from torch_pruning_ext.files import atomic_write_text  # noqa: E402
from torch_pruning_ext.groups import output_layers, trace_graph  # noqa: E402


def _tv(name, **kwargs):
    return lambda: getattr(torchvision.models, name)(num_classes=10, **kwargs)


# family -> (builder, input side); small members of each family, tiny inputs
FAMILIES = {
    "resnet18": (_tv("resnet18"), 64), "resnext50_32x4d": (_tv("resnext50_32x4d"), 64),
    "wide_resnet50_2": (_tv("wide_resnet50_2"), 64), "mobilenet_v2": (_tv("mobilenet_v2"), 64),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64), "efficientnet_b0": (_tv("efficientnet_b0"), 64),
    "densenet121": (_tv("densenet121"), 64), "googlenet": (_tv("googlenet", aux_logits=False, init_weights=True), 64),
    "squeezenet1_1": (_tv("squeezenet1_1"), 64), "mnasnet0_5": (_tv("mnasnet0_5"), 64),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), 64), "regnet_y_400mf": (_tv("regnet_y_400mf"), 64),
    "convnext_tiny": (_tv("convnext_tiny"), 64), "vgg11_bn": (_tv("vgg11_bn"), 64), "alexnet": (_tv("alexnet"), 64),
    "vit_tiny": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                           mlp_dim=128, num_classes=10), 32),
}
FIELDS = ["model", "sparsity", "method", "groups", "fused", "fallbacks", "params_before", "params_after",
          "metapruner_params", "output_ok", "seconds"]


def randomized(builder, seed: int = 0) -> torch.nn.Module:
    """The model with random weights and BatchNorm statistics a trained model could have."""
    torch.manual_seed(seed)
    return randomize_batchnorms(builder(), seed)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def metapruner_params(model, example, sparsity: float) -> int:
    """Parameters after torch-pruning's MetaPruner prunes every group at the same ratio."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's notes on unwrapped parameters
        graph = trace_graph(model, example)
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=sparsity, ignored_layers=output_layers(graph))
        pruner.step()
    return params(model)


def run_family(name: str, sparsity: float, methods=("default", "intra_fusion_fp")) -> list[dict]:
    builder, side = FAMILIES[name]
    base = randomized(builder)
    example = torch.randn(2, 3, side, side)
    reference = metapruner_params(base, example[:1], sparsity)
    rows = []
    for method in methods:
        model = copy.deepcopy(base)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = IntraFusionPruner(model, example[:1])
            results = pruner.prune("all", sparsity, OptimalTransport() if method != "default" else None,
                                   fusion_rule="function_preserving")
        seconds = time.perf_counter() - started
        with torch.no_grad():
            out = model(example)
        reasons = Counter(r.fallback_reason.split(": ", 1)[-1] for r in results if r.fallback_reason)
        rows.append({"model": name, "sparsity": sparsity, "method": method, "groups": len(results),
                     "fused": sum(r.fused for r in results),
                     "fallbacks": "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items())),
                     "params_before": params(base), "params_after": params(model), "metapruner_params": reference,
                     "output_ok": bool(out.shape == (2, 10) and torch.isfinite(out).all()),
                     "seconds": round(seconds, 2)})
    return rows


def page(rows: list[dict], command: str) -> str:
    lines = ["# Any model torch-pruning can prune", "",
             "Torchvision models with random weights and randomised BatchNorm statistics, BatchNorm not folded",
             "(it is merged along the transport map), inputs 2 x 3 x 64 x 64 (ViT: 32 x 32), the whole network",
             f"pruned at sparsity {rows[0]['sparsity']} with the function-preserving rule. `MetaPruner` is",
             "torch-pruning's own pruner at the same ratio (L1 importance, same ignored output layers): our",
             "parameter count should match it. Seconds: graph trace, pruning and fusion on this machine's 2 CPU cores (idle).",
             "A group falls back (pruned without fusion, with a warning naming the layer) only where its",
             "channels pass through torchvision's nn.MultiheadAttention, whose inner width is tied to them",
             "(LayerNorm scales and shifts are merged like other per-channel parameters).", "",
             f"Regenerate: `{command}`", "",
             "| model | method | groups | fused | params before | after | MetaPruner | vs MetaPruner | output | s | falls back because of |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in rows:
        ratio = int(row["params_after"]) / int(row["metapruner_params"]) - 1
        lines.append(f"| {row['model']} | {row['method']} | {row['groups']} | {row['fused']} | "
                     f"{int(row['params_before']):,} | {int(row['params_after']):,} | {int(row['metapruner_params']):,} | "
                     f"{ratio:+.2%} | {'ok' if str(row['output_ok']) == 'True' else 'BROKEN'} | {row['seconds']} | "
                     f"{row['fallbacks'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return zoo_main(argv, "zoo.py", __doc__, FAMILIES, run_family, FIELDS, page, "docs/results/zoo.csv", "docs/ZOO.md")


def zoo_main(argv, script: str, doc: str, families: dict, run_family, fields, page, csv_default: str,
             page_default: str) -> int:
    """The command line of a zoo script: run the families, then write the CSV and the page."""
    parser = OneLineParser(prog=script, description=doc.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(families), choices=list(families), metavar="MODEL")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--csv", default=str(ROOT / csv_default))
    parser.add_argument("--page", default=str(ROOT / page_default))

    def run(args) -> int:
        rows = []
        for number, name in enumerate(args.models, 1):
            new = run_family(name, args.sparsity)
            rows += new
            print(f"[{number}/{len(args.models)}] {name}: " + ", ".join(
                f"{r['method']} {r['fused']} fused, {r['seconds']} s" for r in new), flush=True)
        command = f"python scripts/{script}" + (f" --models {' '.join(args.models)}"
                                                if args.models != list(families) else "")
        write_results(rows, fields, args.csv, args.page, page(rows, command))
        return 0
    return run_cli(script, run, parser.parse_args(argv))


def write_results(rows: list[dict], fields: list[str], csv_path: str, page_path: str, page_text: str) -> None:
    """The rows as CSV and the page, each replaced in one atomic rename."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(page_path, page_text)
    print(f"wrote {csv_path} and {page_path}")


if __name__ == "__main__":
    sys.exit(main())
