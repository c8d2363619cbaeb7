#!/usr/bin/env python
"""Benchmark the data-free protocol: the default main.py job with and without prefix reuse,
a time split of one cell, the transport solve for growing groups and for one wide (4096-channel)
group. Prints numbers only."""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import main  # noqa: E402
from torch_pruning_ext.bn_folding import fold_batchnorms  # noqa: E402
from torch_pruning_ext.experiments.checkpoints import load_model, resolve_checkpoint  # noqa: E402
from torch_pruning_ext.experiments.data import calibration_set, dataset_info, load_split, normalize  # noqa: E402
from torch_pruning_ext.experiments.evaluation import accuracy  # noqa: E402
from torch_pruning_ext.l1_kernel import l1_kernel  # noqa: E402
from torch_pruning_ext.modes import as_fast_input, fast_layout  # noqa: E402
from torch_pruning_ext.optimal_transport import OptimalTransport, _unit_rows  # noqa: E402
from torch_pruning_ext.experiments.protocol import repair_images  # noqa: E402
from torch_pruning_ext.pruner import IntraFusionPruner  # noqa: E402
from torch_pruning_ext.reconstruction import repair_by_reconstruction  # noqa: E402
from torch_pruning_ext.synthesis import synthesize_calibration  # noqa: E402


def timed_main(argv) -> float:
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main.main(argv)
    if code != 0:
        raise SystemExit(f"main.py {' '.join(argv)} failed with exit code {code}")
    return time.perf_counter() - started


def shipped_model(name: str, checkpoint=None) -> torch.nn.Module:
    """A shipped Fashion-MNIST checkpoint of `name` (or the file `checkpoint`), loaded."""
    info = dataset_info("fashion-mnist")
    return load_model(resolve_checkpoint(name, "fashion-mnist", checkpoint, ROOT), name, "fashion-mnist",
                      info.num_classes).model


def cell_split(checkpoint, group: int, sparsity: float) -> dict:
    model = shipped_model("vgg11_bn", checkpoint)
    test = load_split("fashion-mnist", "test")
    seconds = {}
    started = time.perf_counter()
    inputs = normalize(test.images, dataset_info("fashion-mnist"))
    seconds["data decode+normalise"] = time.perf_counter() - started
    started = time.perf_counter()
    copy_ = copy.deepcopy(model)
    fold_batchnorms(copy_, inputs[:1], "reference")
    pruner = IntraFusionPruner(copy_, inputs[:1], fold_bn=None)
    seconds["graph+fold"] = time.perf_counter() - started
    result = pruner.prune([group], sparsity, OptimalTransport())[0]
    seconds.update(result.seconds)
    started = time.perf_counter()
    accuracy(copy_, inputs, test.labels)
    seconds["evaluation (full forward)"] = time.perf_counter() - started
    return seconds


def solve_times(sizes, solver: str, p: float) -> list[tuple[int, float, float]]:
    out = []
    for n in sizes:
        generator = torch.Generator().manual_seed(n)
        features = torch.randn(n, 2 * 9 * 64, generator=generator)
        importance = torch.rand(n, generator=generator)
        kept = torch.arange(0, n, 2)
        transport = OptimalTransport(p=p, solver=solver)
        started = time.perf_counter()
        transport.coupling(features, importance, kept)
        total = time.perf_counter() - started
        out.append((n, total, transport.last_solve_seconds))
    return out


def wide_transport(n: int, k: int, width: int, cdist_rows: int) -> dict:
    """Seconds of OptimalTransport().coupling for one wide group (n channels -> k, feature vectors of
    `width` values, like a 4096-channel Linear layer), split into cost matrix and EMD solve; with
    cdist_rows > 0 also torch.cdist(p=1) (the cost before the compiled kernel) on that many rows of the
    same input, scaled to n rows, and whether its distances are bitwise those of the new cost."""
    generator = torch.Generator().manual_seed(width)
    features = torch.randn(n, width, generator=generator)
    importance = torch.rand(n, generator=generator)
    kept = torch.topk(importance, k).indices.sort().values
    transport = OptimalTransport()
    started = time.perf_counter()
    transport.coupling(features, importance, kept)
    out = {"total": time.perf_counter() - started, "cost": transport.last_cost_seconds,
           "solve": transport.last_solve_seconds}
    if cdist_rows:
        vectors = features.double().numpy()
        cost = transport.cost(vectors, vectors[kept.numpy()], kept.numpy())
        rows = min(n, cdist_rows)
        sources = torch.from_numpy(_unit_rows(vectors)[:rows]).float()  # as the cost was made before
        targets = torch.from_numpy(_unit_rows(vectors[kept.numpy()])).float()
        started = time.perf_counter()
        reference = torch.cdist(sources, targets, p=1.0)
        out["cdist"] = (time.perf_counter() - started) * n / rows
        out["identical"] = bool(np.array_equal(reference.double().numpy(), cost[:rows]))
    return out


def print_wide_transport(cdist_rows: int) -> None:
    n, k = 4096, 2048
    print(f"\n== transport of one wide group, n={n} -> k={k}, emd, p=1 (seconds; kernel: "
          f"{'compiled' if l1_kernel() is not None else 'unavailable, torch.cdist'})")
    for width in (4096, 25088):
        numbers = wide_transport(n, k, width, cdist_rows)
        line = (f"  width {width:<6} cost {numbers['cost']:7.2f}  solve {numbers['solve']:6.2f}  "
                f"coupling total {numbers['total']:6.2f}")
        if "cdist" in numbers:
            scaled = "" if cdist_rows >= n else f" (timed on {cdist_rows} rows, x{n / cdist_rows:g})"
            before = numbers["total"] - numbers["cost"] + numbers["cdist"]
            line += (f"  | torch.cdist p=1 {numbers['cdist']:7.2f}{scaled}, same distances: "
                     f"{numbers['identical']}; coupling total with it {before:6.2f}")
        print(line, flush=True)


RECONSTRUCT_MODELS = ("vgg11_bn", "resnet18", "torchvision_resnet18", "pitchnet_narrow", "pitchnet_wide")


def _reconstruct_subject(name: str, samples: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """(BN-folded model, calibration inputs): the shipped checkpoints on Fashion-MNIST images, the
    others with random weights on random inputs (timing only)."""
    if name in ("vgg11_bn", "resnet18"):
        model = shipped_model(name)
        inputs = repair_images(calibration_set("fashion-mnist"), dataset_info("fashion-mnist"), samples, 0)
    elif name == "torchvision_resnet18":
        import torchvision
        model, inputs = torchvision.models.resnet18(num_classes=10), torch.randn(samples, 3, 32, 32)
    else:  # the CREPE-shaped audio model: 1024-sample frames, kernels (512, 1) and (64, 1)
        from torch_pruning_ext.experiments.gallery import PitchNet, pitchnet_wide
        model, inputs = (pitchnet_wide() if name == "pitchnet_wide" else PitchNet()), torch.randn(samples, 1024)
    model.eval()
    fold_batchnorms(model, inputs[:1], "reference")
    return model, inputs


def reconstruct_pass(name: str, samples: int, sparsity: float, batch_size: int | None = None) -> dict:
    """One reconstruct pass over the whole network (default pruning at `sparsity`), then one forward
    pass of the original over the same inputs (channels-last, as the pass runs it): seconds of both
    and the pass's extra peak memory (max RSS growth; run it in a fresh process)."""
    model, inputs = _reconstruct_subject(name, samples)
    pruned = copy.deepcopy(model)
    pruner = IntraFusionPruner(pruned, inputs[:1], fold_bn=None)
    pruner.prune("all", sparsity)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    report = repair_by_reconstruction(model, pruned, pruner.channel_origin, inputs, batch_size=batch_size)
    seconds = time.perf_counter() - started
    extra_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    with torch.no_grad(), fast_layout(model):
        fast = as_fast_input(inputs, inputs.device)
        model(fast[:8])  # warm-up
        started = time.perf_counter()
        model(fast)
        forward = time.perf_counter() - started
    modes = sorted({entry["mode"] for entry in report.values()})
    return {"seconds": seconds, "forward": forward, "extra_peak_mib": extra_kib / 1024,
            "input_mib": inputs.numel() * 4 / 2 ** 20, "modes": modes,
            "input_space_layers": sorted(name for name, entry in report.items() if "why" in entry)}


def print_reconstruct(models=RECONSTRUCT_MODELS, samples: int = 1024, sparsity: float = 0.5,
                      batch_size: int | None = None) -> None:
    batches = "chunks of 384 (the default)" if batch_size is None else f"batch_size={batch_size}"
    print(f"\n== reconstruct repair: whole network s={sparsity} (default pruning), {samples} unlabelled inputs, "
          f"{batches}; forward = one pass of the original over the same inputs")
    for name in models:
        child = subprocess.run([sys.executable, __file__, "--reconstruct-pass", name, str(samples), str(sparsity),
                                str(batch_size or 0)], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"  {name:<21} failed: {(child.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
            continue
        numbers = json.loads(child.stdout.strip().splitlines()[-1])
        fallback = numbers["input_space_layers"]
        print(f"  {name:<21} reconstruct {numbers['seconds']:7.1f} s  forward {numbers['forward']:6.2f} s  "
              f"ratio {numbers['seconds'] / numbers['forward']:5.1f}x  extra peak memory "
              f"{numbers['extra_peak_mib']:6.0f} MiB (inputs {numbers['input_mib']:.0f} MiB)"
              + (f"  input-space fallback: {', '.join(fallback)}" if fallback else ""), flush=True)


def print_synthesis(samples: int) -> None:
    """Seconds to synthesise calibration inputs from VGG11-BN's BatchNorm statistics (issue 28's goal:
    1024 in under 5 minutes on 2 cores)."""
    model = shipped_model("vgg11_bn")
    inputs, report = synthesize_calibration(model, torch.zeros(1, 3, 32, 32), samples)
    print(f"\n== synthetic calibration: VGG11-BN, {report.samples} inputs x {report.iterations} steps: "
          f"{report.seconds:.1f} s; BatchNorm statistics mismatch {report.loss_start:.3f} -> {report.loss_end:.3f}")


def main_bench(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--skip-job", action="store_true", help="skip the (slow) whole-job comparison")
    parser.add_argument("--only-reconstruct", nargs="*", choices=RECONSTRUCT_MODELS, default=None, metavar="MODEL",
                        help=f"run only the reconstruct benchmark (on these of {', '.join(RECONSTRUCT_MODELS)}; "
                             "default all)")
    parser.add_argument("--only-wide-transport", action="store_true",
                        help="run only the wide-group (4096-channel) transport benchmark")
    parser.add_argument("--cdist-rows", type=int, default=256,
                        help="rows on which the wide-group benchmark times torch.cdist p=1 (0: skip; 4096: all)")
    parser.add_argument("--only-synthesis", type=int, metavar="N", default=None,
                        help="run only the synthetic-calibration benchmark, with N inputs (issue 28: 1024)")
    parser.add_argument("--reconstruct-batch-size", type=int, default=None, metavar="N",
                        help="the reconstruct benchmark with batch_size=N (default: the library's, 384)")
    parser.add_argument("--reconstruct-pass", nargs=4, metavar=("MODEL", "SAMPLES", "SPARSITY", "BATCH"), default=None,
                        help=argparse.SUPPRESS)  # internal: one timed pass, printed as JSON
    args = parser.parse_args(argv)
    if args.reconstruct_pass:
        name, samples, sparsity, batch_size = args.reconstruct_pass
        print(json.dumps(reconstruct_pass(name, int(samples), float(sparsity), int(batch_size) or None)))
        return 0
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    if args.only_reconstruct is not None:
        print_reconstruct(args.only_reconstruct or RECONSTRUCT_MODELS, batch_size=args.reconstruct_batch_size)
        return 0
    if args.only_synthesis:
        print_synthesis(args.only_synthesis)
        return 0
    if args.only_wide_transport:
        print_wide_transport(args.cdist_rows)
        return 0

    print("\n== one cell: VGG11-BN group 2, sparsity 0.5, intra_fusion (seconds)")
    for name, value in cell_split(args.checkpoint, 2, 0.5).items():
        print(f"  {name:<28}{value:9.3f}")

    print("\n== transport (n channels -> n/2, features of 1152 values): cost + solve / solve only, ms")
    # p=1 is the paper's cost (an L1 distance, no matrix-product shortcut); p=2 goes through a GEMM
    for solver, p in (("emd", 1), ("emd", 2), ("sinkhorn", 1)):
        sizes = [64, 256, 512, 1024, 2048, 4096]
        for n, total, solve in solve_times(sizes, solver, p):
            print(f"  {solver:<9}p={p} n={n:<5}{1000 * total:10.1f} {1000 * solve:10.1f}")
    print_wide_transport(args.cdist_rows)

    print_reconstruct(batch_size=args.reconstruct_batch_size)

    if not args.skip_job:
        extra = ["--checkpoint", args.checkpoint] if args.checkpoint else []
        print("\n== default `python main.py` job (VGG11-BN, Fashion-MNIST, 3 groups x 5 sparsities x 2 methods)")
        with_reuse = timed_main(extra)
        print(f"  with reuse    {with_reuse:8.1f} s")
        without = timed_main(extra + ["--no-reuse"])
        print(f"  without reuse {without:8.1f} s")
        print(f"  speed-up      {without / with_reuse:8.2f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
