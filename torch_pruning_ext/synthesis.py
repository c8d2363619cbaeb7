"""Calibration inputs synthesised from a trained model's own BatchNorm statistics: no data needed.

A BatchNorm's running mean and variance are the statistics of its input over the training data.
Inputs optimised from noise until every BatchNorm's batch statistics match its running ones (ZeroQ's
"distilled data"; DeepInversion's feature-statistics term) carry enough of the training
distribution for the least-squares reconstruction to refit a pruned network. The statistics are
read at each BatchNorm's input, so a BatchNorm after the activation works like one after a layer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .checks import check_choice
from .modes import as_fast_input, eval_mode, fast_layout

SYNTHETIC_SAMPLES = 256  # inputs synthesised by default by compress(): 1024 cost 4x the time


@dataclass
class SynthesisReport:
    """What synthesis did: samples, iterations per batch, seconds, the statistics mismatch (mean
    over BatchNorms of the squared errors of the batch means and variances) at the start and end,
    and whether the time bound cut it short."""
    samples: int
    iterations: int
    batchnorms: int
    seconds: float
    loss_start: float
    loss_end: float
    stopped_early: bool = False


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None and m.running_var is not None]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has the BatchNorm statistics synthesis matches."""
    return bool(_batchnorms(model))


def _batch_moments(captured: dict, batchnorms) -> list[tuple]:
    """(batch mean, batch variance, BatchNorm) per BatchNorm, in float32, from the inputs it received."""
    moments = []
    for bn in batchnorms:
        x = captured[bn].float()
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dims, unbiased=False)
        moments.append((mean, var, bn))
    return moments


def _squared_errors(moments) -> torch.Tensor:
    """Mean over BatchNorms of the summed squared errors of the means and variances (ZeroQ's loss;
    also what the report shows, whatever the objective)."""
    return torch.stack([((mean - bn.running_mean) ** 2).sum() + ((var - bn.running_var) ** 2).sum()
                        for mean, var, bn in moments]).mean()


def _divergence(moments) -> torch.Tensor:
    """Mean over BatchNorms and channels of KL(batch Gaussian || running Gaussian): scale-free, so
    every layer and channel counts alike (the squared errors are dominated by the widest variances)."""
    losses = []
    for mean, var, bn in moments:
        var, running = var + bn.eps, bn.running_var + bn.eps
        losses.append((0.5 * (torch.log(running / var) + (var + (mean - bn.running_mean) ** 2) / running - 1)).mean())
    return torch.stack(losses).mean()


OBJECTIVES = {"moments": _squared_errors, "kl": _divergence}


def _roughness(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbours along the spatial (or time) dimensions: a smoothness prior."""
    dims = range(2, x.dim()) if x.dim() > 2 else range(1, x.dim())
    return sum((x.diff(dim=d) ** 2).mean() for d in dims)


def synthesize_calibration(model: nn.Module, example_inputs: torch.Tensor, n: int = SYNTHETIC_SAMPLES,
                           iterations: int = 50, lr: float = 0.5, batch_size: int = 256, seed: int = 0,
                           jitter: int = 2, smoothness: float = 0.01, objective: str = "kl", bfloat16: bool = False,
                           max_seconds: float | None = None,
                           progress=None) -> tuple[torch.Tensor, SynthesisReport]:
    """`n` inputs shaped like one sample of `example_inputs`, optimised (Adam, cosine learning rate,
    `iterations` steps per batch of `batch_size`) so that each BatchNorm's batch mean and variance
    match its running statistics, with random shifts of up to `jitter` along the last dimensions and
    a `smoothness` prior. objective: "kl" (the Gaussian divergence per channel, scale-free) or
    "moments" (ZeroQ's squared errors of means and variances); the defaults are what
    scripts/synthesis_study.py measured best per second (docs/WHOLE.md). bfloat16=True runs the model
    under bfloat16 autocast: about 2x faster where the hardware has it, the statistics stay float32.
    Seeded: the same seed gives the same inputs (on one machine). `max_seconds` bounds the time:
    the batch under way stops where it is and later batches are left out (the report says how many
    inputs came back); progress(done, total) is called per step.
    The model is not changed (it runs in eval mode; only the inputs get gradients)."""
    if not isinstance(example_inputs, torch.Tensor) or not example_inputs.is_floating_point():
        raise ValueError("synthetic calibration needs example_inputs as one floating-point tensor, got "
                         f"{type(example_inputs).__name__}" + (f" of dtype {example_inputs.dtype}"
                                                                  if isinstance(example_inputs, torch.Tensor) else ""))
    check_choice(objective, OBJECTIVES, "synthesis objective")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of synthetic inputs must be a positive integer, got {n!r}")
    batchnorms = _batchnorms(model)
    if not batchnorms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm with running statistics, which synthetic "
                         "calibration matches; pass real calibration inputs instead (a language model called with token "
                         "ids gets sequences sampled from itself: sampling.sample_calibration)")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = example_inputs.device
    captured: dict = {}
    handles = [bn.register_forward_pre_hook(lambda module, args: captured.__setitem__(module, args[0]))
               for bn in batchnorms]
    batches = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    total_steps, done, stopped = len(batches) * iterations, 0, False
    started = time.perf_counter()
    results, first, last = [], None, None
    try:
        with eval_mode(model), fast_layout(model):
            for size in batches:
                x = as_fast_input(torch.randn((size,) + tuple(example_inputs.shape[1:]), generator=generator), device)
                x.requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=lr)
                for step in range(iterations):
                    if max_seconds is not None and time.perf_counter() - started > max_seconds:
                        stopped = True
                        break
                    for group in optimizer.param_groups:
                        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / iterations))
                    shifts = torch.randint(-jitter, jitter + 1, (min(2, x.dim() - 1),), generator=generator).tolist()
                    moved = torch.roll(x, shifts, tuple(range(x.dim() - len(shifts), x.dim()))) if jitter else x
                    with torch.enable_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=bfloat16):
                        model(moved)
                        moments = _batch_moments(captured, batchnorms)
                        loss = OBJECTIVES[objective](moments) + smoothness * _roughness(x)
                        (gradient,) = torch.autograd.grad(loss, x)
                    x.grad = gradient
                    optimizer.step()
                    with torch.no_grad():
                        last = float(_squared_errors(moments))
                    first = last if first is None else first
                    done += 1
                    if progress is not None:
                        progress(done, total_steps)
                results.append(x.detach().contiguous())
                if stopped:  # the batches not started are left out: noise would only mislead a refit
                    break
    finally:
        for handle in handles:
            handle.remove()
    inputs = torch.cat(results)
    report = SynthesisReport(len(inputs), iterations, len(batchnorms), time.perf_counter() - started,
                             first if first is not None else float("nan"), last if last is not None else float("nan"),
                             stopped)
    return inputs, report
