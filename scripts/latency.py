#!/usr/bin/env python
"""Inference latency of unpruned vs pruned VGG11-BN / ResNet18: PyTorch eager on the CPU and
onnxruntime, batch 1 and 128, median and spread of repeated runs after warm-up, with MACs and params.

Default pruning and Intra-Fusion give the same shapes, so one pruned model per cell is timed.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from torch_pruning_ext.export import export_onnx, onnx_session  # noqa: E402
from torch_pruning_ext.files import atomic_write_text  # noqa: E402
from torch_pruning_ext.experiments.models import build_model  # noqa: E402
from torch_pruning_ext.pruner import IntraFusionPruner  # noqa: E402


def measure(run, repeats: int, warmup: int) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile of `repeats` timed calls, in milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - started))
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90))


def pruned_model(name: str, cell: str, sparsity: float):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    if cell != "unpruned":
        pruner = IntraFusionPruner(model, torch.randn(1, 3, 32, 32), fold_bn="exact")
        pruner.prune("all" if cell == "whole" else [int(cell)], sparsity)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg11_bn", "resnet18"])
    parser.add_argument("--cells", nargs="+", default=["unpruned", "1:0.5", "whole:0.5", "whole:0.7"],
                        help="'unpruned', GROUP:SPARSITY or whole:SPARSITY")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads). Median [p10, p90] of {args.repeats} runs after "
             f"{args.warmup} warm-up runs, milliseconds per batch.", "",
             "| model | cell | params | MACs | batch | PyTorch eager | onnxruntime |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for spec in args.cells:
                cell, _, sparsity = spec.partition(":")
                model = pruned_model(name, cell, float(sparsity or 0))
                macs, params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, 32, 32))
                onnx_path = Path(folder) / f"{name}_{cell}.onnx"
                export_onnx(model, torch.randn(2, 3, 32, 32), onnx_path)
                session = onnx_session(onnx_path)
                for batch in args.batches:
                    x = torch.randn(batch, 3, 32, 32)
                    with torch.inference_mode():
                        eager = measure(lambda: model(x), args.repeats, args.warmup)
                    feed = {"input": x.numpy()}
                    ort = measure(lambda: session.run(None, feed), args.repeats, args.warmup)
                    label = "unpruned" if cell == "unpruned" else f"{'whole network' if cell == 'whole' else 'group ' + cell} s={sparsity}"
                    line = (f"| {name} | {label} | {params / 1e6:.2f} M | {macs / 1e6:.1f} M | {batch} | "
                            f"{eager[0]:.2f} [{eager[1]:.2f}, {eager[2]:.2f}] | {ort[0]:.2f} [{ort[1]:.2f}, {ort[2]:.2f}] |")
                    lines.append(line)
                    print(line, flush=True)
    if args.output:
        atomic_write_text(args.output, "# Inference latency\n\nProduced by `python scripts/latency.py`.\n\n"
                          + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
