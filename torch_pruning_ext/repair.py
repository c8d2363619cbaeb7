"""Repair after pruning: give the changed channels back the mean and spread they had.

Fusing or dropping channels shifts the statistics of the kept channels and of the layers that read
them; the next layers were trained on the old statistics. An affine correction per channel (REPAIR,
Jordan et al. 2023) is folded straight into the layer's weights and bias, so the repaired model is
still a plain network.

- "data": statistics measured on unlabelled images in the original and the pruned model, layer by
  layer in execution order (each layer is measured after the earlier ones were corrected), for the
  producers and consumers of the pruned groups.
- "data_downstream": the same, and also every later Conv/Linear layer (output layers excepted):
  their channels are the originals, but their inputs have shifted, so they drift too.
- "datafree": the pruned producers' statistics predicted from the original BatchNorm statistics and
  the transport map, with no data (consumers are left alone: their input distribution is unknown).
- "variance": Model Folding's data-free repair: a merged channel's spread around its BatchNorm
  shift is scaled back by 1 / sqrt(m^T R m) (m: its producer map row, R: the correlations of the
  merged channels, estimated by their weight rows' cosine similarity); for an average of n_c
  channels with mean correlation rho that is Model Folding's sqrt(n_c / (1 + (n_c - 1) rho)).
- "reconstruct": every Conv/Linear layer refitted by least squares so that, from the pruned model's
  inputs, it reproduces the original layer's outputs of the channels it keeps (reconstruction.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .modes import eval_mode
from .checks import check_choice
from .groups import ROOT_TYPES, out_channels
from .inputs import batch_length, run_model, take
from .pruner import channel_origin
from .standard_layers import set_bias
from .reconstruction import RECONSTRUCT_COST, fused_row_maps, repair_by_reconstruction

DATA_MODES = ("data", "data_downstream", "reconstruct")  # the modes that need unlabelled images
_EPS = 1e-8


def check_mode(mode: str) -> None:
    check_choice(mode, REPAIR_MODES, "repair mode")


_MOMENT_CHUNK = 64  # images per float64 copy: bounds the extra memory of the statistics


class _AllRepaired(Exception):
    pass


def _moments(output: torch.Tensor) -> list:
    """Per-channel sum, sum of squares and count of a layer output (in float64)."""
    total = squares = 0
    for part in output.detach().split(_MOMENT_CHUNK):
        values = part.double().transpose(0, 1).reshape(part.shape[1], -1)
        total, squares = total + values.sum(1), squares + (values ** 2).sum(1)
    return [total, squares, output.numel() // output.shape[1]]


def _mean_std(total, squares, count) -> tuple[torch.Tensor, torch.Tensor]:
    mean = total / count
    return mean, (squares / count - mean ** 2).clamp_min(0).sqrt()


@torch.inference_mode()
def layer_statistics(model: nn.Module, names: list[str], inputs,
                     batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-output-channel mean and std of the named layers over `inputs` (eval mode); layers that
    never run are left out."""
    modules = dict(model.named_modules())
    sums: dict[str, list] = {}

    def hook(name):
        def record(_, __, output):
            moments = _moments(output)
            sums[name] = [a + b for a, b in zip(sums[name], moments)] if name in sums else moments
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        with eval_mode(model):
            for start in range(0, batch_length(inputs), batch_size):
                run_model(model, take(inputs, slice(start, start + batch_size)))
    finally:
        for handle in handles:
            handle.remove()
    return {name: _mean_std(*sums[name]) for name in names if name in sums}


@torch.no_grad()
def apply_affine(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make the layer output `scale * y + shift` per output channel (folded into weight and bias)."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(scale.view(shape).to(layer.weight.dtype))
    bias = layer.bias if layer.bias is not None else torch.zeros(out_channels(layer), dtype=layer.weight.dtype)
    set_bias(layer, (bias.double() * scale + shift).to(layer.weight.dtype))


def _correction(mean_p, std_p, mean_o, std_o):
    """Scale and shift taking (mean_p, std_p) to (mean_o, std_o); dead channels stay dead."""
    alive = std_p > _EPS
    scale = torch.where(alive, std_o / std_p.clamp_min(_EPS), torch.ones_like(std_p))
    shift = torch.where(alive | (mean_p.abs() > _EPS), mean_o - scale * mean_p, torch.zeros_like(mean_p))
    return scale, shift


@torch.no_grad()
def repair_with_data(original: nn.Module, pruned: nn.Module, layers: list[str],
                     channel_origin: dict[str, torch.Tensor], inputs, batch_size: int = 256,
                     downstream=(), reference_stats: dict | None = None) -> None:
    """Match each named layer's output statistics in `pruned` to those of `original` (same names).

    channel_origin maps a pruned layer's out-channels to the original channels they stand for
    (layers absent from it kept all their channels). `original` is measured in batches of
    `batch_size`; `pruned` sees all `inputs` in one batch, so a single forward pass repairs every
    layer in execution order: each layer is measured, corrected, and hands its corrected output on
    (memory grows with the number of inputs). The pass stops after the last of them; layers that
    never run are left alone. `downstream` names further layers, corrected only when they run after
    one of `layers` has been. reference_stats: layer_statistics(original, ..., inputs) computed
    beforehand (once for many pruned copies of one model); `original` is then not run.
    """
    changed = set(layers)
    wanted = list(dict.fromkeys([*layers, *downstream]))
    if reference_stats is None:
        reference = layer_statistics(original, wanted, inputs, batch_size)
    else:
        reference = {name: reference_stats[name] for name in wanted if name in reference_stats}
    modules = dict(pruned.named_modules())
    repaired = set()

    def hook(name):
        def correct(layer, args, kwargs, output):
            if name in repaired or (name not in changed and not repaired):  # first call; downstream only
                return None
            repaired.add(name)
            mean_p, std_p = _mean_std(*_moments(output))
            origin = channel_origin.get(name, torch.arange(out_channels(layer)))
            apply_affine(layer, *_correction(mean_p, std_p, reference[name][0][origin], reference[name][1][origin]))
            if len(repaired) == len(reference):
                raise _AllRepaired
            return layer.forward(*args, **kwargs)  # the corrected layer's output (forward() skips the hooks)
        return correct

    handles = [modules[name].register_forward_hook(hook(name), with_kwargs=True) for name in reference]
    try:
        with eval_mode(pruned):
            run_model(pruned, inputs)
    except _AllRepaired:
        pass
    finally:
        for handle in handles:
            handle.remove()


def batchnorm_sources(pairs) -> tuple[dict[str, str], set[str]]:
    """From folded (layer, BN) pairs: layer -> BN name for the data-free repairs (BNs folded into
    their layer, and BNs after a ReLU, whose statistics describe its output), and the layers of the
    second kind. A BN after a LeakyReLU is left out: its statistics are not a rectified Gaussian's."""
    usable = [pair for pair in pairs if pair.activation in (None, "ReLU")]
    return ({pair.layer: pair.batchnorm for pair in usable},
            {pair.layer for pair in usable if pair.activation == "ReLU"})


def _folded_channel_stats(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of a BN's output in the original model, from its running statistics."""
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(gamma)
    var = bn.running_var.double()
    return beta, gamma.abs() * torch.sqrt(var / (var + bn.eps))


def _gaussian_before_relu(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of a Gaussian z whose ReLU has this mean and variance: E[relu z]^2 / E[(relu z)^2]
    grows monotonically with E[z] / std(z), which bisection finds."""
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))

    def first_second(t):  # E[relu z] / s and E[(relu z)^2] / s^2 for z ~ N(t s, s^2)
        cdf, pdf = normal.cdf(t), normal.log_prob(t).exp()
        return t * cdf + pdf, (t * t + 1) * cdf + t * pdf
    mean, var = mean.double().clamp_min(_EPS), var.double().clamp_min(0)
    target = mean ** 2 / (var + mean ** 2)
    low, high = torch.full_like(mean, -8.0), torch.full_like(mean, 8.0)
    for _ in range(60):
        middle = (low + high) / 2
        first, second = first_second(middle)
        below = first ** 2 / second < target
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    t = (low + high) / 2
    std = mean / first_second(t)[0]
    return t * std, std


def _producer_stats(bn: nn.modules.batchnorm._BatchNorm, after_relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the folded producer's output channels: the BN's own for a BN right after the
    layer; for a BN after a ReLU (whose scale magnitude was moved into the layer) the Gaussian whose
    ReLU has the BN's running statistics, at the layer's new scale."""
    if not after_relu:
        return _folded_channel_stats(bn)
    mean, std = _gaussian_before_relu(bn.running_mean, bn.running_var)
    scale = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).abs()
    return mean * scale, std * scale


def _fused_producers(original_unfolded: nn.Module, original_folded: nn.Module, pruned: nn.Module, results,
                     bn_of: dict[str, str], after_relu: set[str]):
    """(result, mean and std of the layer's original channels, the correlations of those channels
    estimated by the cosine similarity of their folded weight rows, the pruned layer) for every
    producer of a fused group that had a BatchNorm: what the data-free repairs work from."""
    unfolded, folded = dict(original_unfolded.named_modules()), dict(original_folded.named_modules())
    current = dict(pruned.named_modules())
    for result in results:
        if result.producer_map is None:
            continue
        for name in result.producers:
            if name not in bn_of:
                continue
            rows = folded[name].weight.detach().double().flatten(1)
            unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(_EPS)
            mean, std = _producer_stats(unfolded[bn_of[name]], name in after_relu)
            yield result, name, mean, std, unit @ unit.t(), current[name]


def repair_without_data(original_unfolded: nn.Module, original_folded: nn.Module, pruned: nn.Module,
                        results, channel_origin: dict[str, torch.Tensor], bn_of: dict[str, str],
                        after_relu: set[str] = frozenset()) -> None:
    """Data-free repair of fused producers: predict each fused channel's mean/std from the original
    BN statistics and the producer map (correlations estimated by the cosine similarity of the
    channels' weight rows), and correct it to the statistics of the channel it stands for.
    after_relu: the layers of bn_of whose BN follows a ReLU (conv -> ReLU -> BN)."""
    for result, name, mean, std, correlation, layer in _fused_producers(
            original_unfolded, original_folded, pruned, results, bn_of, after_relu):
        origin = channel_origin.get(name, torch.arange(len(mean)))
        # the map acts on the channels present before this group was pruned: restrict to them
        before = _origin_before(result, origin, len(mean))
        mix = result.producer_map.double()
        mean_p = mix @ mean[before]
        cov = correlation[before][:, before] * torch.outer(std[before], std[before])
        std_p = torch.einsum("ji,ik,jk->j", mix, cov, mix).clamp_min(0).sqrt()
        scale, shift = _correction(mean_p, std_p, mean[origin], std[origin])
        apply_affine(layer, scale, shift)
        if name in after_relu:  # the BN after the ReLU: each kept channel gets its own shift and sign back
            _restore_batchnorm(original_folded, pruned, bn_of[name], origin)


@torch.no_grad()
def _restore_batchnorm(original_folded: nn.Module, pruned: nn.Module, name: str, origin: torch.Tensor) -> None:
    source, target = dict(original_folded.named_modules())[name], dict(pruned.named_modules())[name]
    for key in ("weight", "bias", "running_mean", "running_var"):
        getattr(target, key).copy_(getattr(source, key)[origin])


def repair_variance(original_unfolded: nn.Module, original_folded: nn.Module, pruned: nn.Module, results,
                    bn_of: dict[str, str], after_relu: set[str] = frozenset()) -> None:
    """Model Folding's data-free variance repair of every fused producer that had a BatchNorm: each
    kept channel becomes f * (y - c) + c, c the mix of the merged channels' means (their BN shifts,
    or for a BN after a ReLU the mean before it) and f = 1 / sqrt(m^T R m). Exact twins (R = 1) and
    unfused channels are left as they are."""
    for result, _, mean, _, correlation, layer in _fused_producers(
            original_unfolded, original_folded, pruned, results, bn_of, after_relu):
        if len(correlation) != result.channels:
            raise ValueError("the variance repair needs each layer pruned at most once")
        mix = result.producer_map.double()
        scale = torch.einsum("ji,ik,jk->j", mix, correlation, mix).clamp_min(_EPS).rsqrt()
        apply_affine(layer, scale, (1 - scale) * (mix @ mean))


def _origin_before(result, origin_after: torch.Tensor, original_count: int) -> torch.Tensor:
    """Original indices of the channels a group saw, given those left after it (kept in order)."""
    if result.channels == original_count:
        return torch.arange(original_count)
    raise ValueError("data-free repair needs each layer pruned at most once")


@dataclass
class RepairJob:
    """What the repairs read for one pruned copy; compress() and the protocol fill it alike."""
    original: nn.Module  # the model as given (BatchNorm unfolded): the data-free repairs read its statistics
    folded: nn.Module  # the original after BatchNorm folding, which the pruned copy is compared with
    pruned: nn.Module  # repaired in place
    results: list  # the pruner's GroupResults
    batchnorm_of: dict  # batchnorm_sources(...) of the fold
    after_relu: set
    inputs: object = None  # unlabelled calibration batch (the data modes)
    protected: frozenset = frozenset()  # layers "data_downstream" leaves alone (those feeding the outputs)
    reference_stats: dict | None = None  # the folded original's layer_statistics, when measured before
    seed: int = 0
    batch_size: int | None = None  # reconstruct: samples per pass (None: all in one)
    memory_budget: int | None = None
    cost: float = RECONSTRUCT_COST


def _repair_reconstruct(job: RepairJob) -> dict:
    # each layer aims at what its channels stand for after the method: fused rows where fused
    return repair_by_reconstruction(job.folded, job.pruned, channel_origin(job.results), job.inputs,
                                    row_maps=fused_row_maps(job.folded, job.results), seed=job.seed,
                                    batch_size=job.batch_size, memory_budget=job.memory_budget, cost=job.cost)


def _repair_statistics(job: RepairJob, downstream: bool) -> dict:
    changed = sorted({name for r in job.results for name in r.producers + r.consumers})
    later = [name for name, module in job.pruned.named_modules()
             if isinstance(module, ROOT_TYPES) and name not in job.protected] if downstream else []
    repair_with_data(job.folded, job.pruned, changed, channel_origin(job.results), job.inputs, downstream=later,
                     reference_stats=job.reference_stats)
    return {}


def _repair_datafree(job: RepairJob) -> dict:
    repair_without_data(job.original, job.folded, job.pruned, job.results, channel_origin(job.results),
                        job.batchnorm_of, job.after_relu)
    return {}


def _repair_variance(job: RepairJob) -> dict:
    repair_variance(job.original, job.folded, job.pruned, job.results, job.batchnorm_of, job.after_relu)
    return {}


# the repairs by name: a new one is a function of a RepairJob plus its line here (DATA_MODES too if it
# reads calibration inputs); the CLI choices come from this registry
REPAIRS = {"none": lambda job: {}, "data": lambda job: _repair_statistics(job, downstream=False),
           "data_downstream": lambda job: _repair_statistics(job, downstream=True), "datafree": _repair_datafree,
           "variance": _repair_variance, "reconstruct": _repair_reconstruct}
REPAIR_MODES = tuple(REPAIRS)


def apply_repair(mode: str, job: RepairJob) -> dict:
    """Repair job.pruned in place with `mode` (one of REPAIR_MODES); returns the reconstruction's
    per-layer report (empty for the other modes)."""
    check_mode(mode)
    if mode in DATA_MODES and job.inputs is None:
        raise ValueError(f"repair {mode!r} needs unlabelled calibration inputs")
    return REPAIRS[mode](job)
