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
  inputs, it reproduces the original layer's outputs of the channels it keeps (repair_by_reconstruction).
"""
from __future__ import annotations

import queue
import threading

import torch
import torch.nn as nn

from .modes import as_fast_input, eval_mode, fast_layout
from .checks import check_choice
from .groups import ROOT_TYPES, out_channels
from .patches import (PATCH_TYPES, output_rows, patch_rows, positions_per_sample, rows_to_weight, samples_of,
                      weight_rows)

REPAIR_MODES = ("none", "data", "data_downstream", "datafree", "variance", "reconstruct")
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
def layer_statistics(model: nn.Module, names: list[str], inputs: torch.Tensor,
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
            for start in range(0, inputs.shape[0], batch_size):
                model(inputs[start:start + batch_size])
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
    new_bias = (bias.double() * scale + shift).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def _correction(mean_p, std_p, mean_o, std_o):
    """Scale and shift taking (mean_p, std_p) to (mean_o, std_o); dead channels stay dead."""
    alive = std_p > _EPS
    scale = torch.where(alive, std_o / std_p.clamp_min(_EPS), torch.ones_like(std_p))
    shift = torch.where(alive | (mean_p.abs() > _EPS), mean_o - scale * mean_p, torch.zeros_like(mean_p))
    return scale, shift


@torch.no_grad()
def repair_with_data(original: nn.Module, pruned: nn.Module, layers: list[str],
                     channel_origin: dict[str, torch.Tensor], inputs: torch.Tensor, batch_size: int = 256,
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
            pruned(inputs)
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


# ---------------------------------------------------------------------------------------------------
# "reconstruct": data-driven fusion by least squares
# ---------------------------------------------------------------------------------------------------
RECONSTRUCT_RIDGE = 1e-3  # ridge lambda, relative to the mean diagonal of the pruned input's Gram matrix
RECONSTRUCT_SPACES = ("output", "input")
RECONSTRUCT_POSITIONS = 2 ** 18  # at most this many output positions per layer for the output-space fit
RECONSTRUCT_COST = 1.0  # an output-space fit may cost this many times the original layer's MACs on the data
#                        plus the same multiple of an even share of the whole model's
_FREE_MACS = 2 ** 30  # an allowance of at least this (about 15 ms on two cores): small fits always fit
RECONSTRUCT_POSITIONS_PER_FEATURE = 32  # and at most this many per feature (weight column) of the layer
RECONSTRUCT_MIN_POSITIONS = 4  # per feature: with fewer, the layer falls back to the input-space map
_GRAM_CHUNK_BYTES = 64 * 2 ** 20  # layer inputs (or patches) per accumulation step


class _Stop(Exception):
    """Ends a forward pass early (every layer refitted, or the other side failed)."""


def _as_rows(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """(channels, positions) view of a layer input: every spatial position of every image is a sample."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _chunks(x: torch.Tensor, bytes_per_image: int):
    step = max(1, _GRAM_CHUNK_BYTES // max(1, bytes_per_image))
    return x.split(step)


def _run_order(model: nn.Module, names: list[str], example: torch.Tensor) -> tuple[list[str], dict[str, int]]:
    """The named layers in the order of their first call on `example` (layers that never run are left
    out), and the multiply-adds each computes per sample (outputs x weights per output)."""
    modules, order, macs = dict(model.named_modules()), [], {}

    def count(name):
        def hook(layer, _, output):
            if name not in macs and isinstance(output, torch.Tensor):
                macs[name] = output.numel() // len(example) * layer.weight[0].numel()
        return hook
    handles = [modules[name].register_forward_pre_hook(lambda *_, n=name: order.append(n) if n not in order else None)
               for name in names] + [modules[name].register_forward_hook(count(name)) for name in names]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return order, macs


def _solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float, intercept: bool) -> torch.Tensor:
    """argmin_S |target - S^T A|^2 + lambda |S|^2 from the Gram matrices G = A A^T and
    cross = A target^T (the intercept row is not penalised); lambda is `ridge` times the mean
    diagonal of G."""
    size = gram.shape[0] - int(intercept)
    scale = gram.diagonal()[:size].mean().clamp_min(1e-12) if size else gram.new_tensor(1.0)
    penalty = torch.full((gram.shape[0],), ridge * float(scale), dtype=gram.dtype, device=gram.device)
    if intercept:
        penalty[-1] = 1e-12 * float(scale)
    system = gram + torch.diag(penalty)
    factor, info = torch.linalg.cholesky_ex(system)  # symmetric positive definite: half the work of LU
    if int(info) == 0:
        return torch.cholesky_solve(cross, factor)
    # singular even with the ridge (e.g. ridge=0 and dead channels)
    return torch.linalg.lstsq(system.cpu(), cross.cpu()).solution.to(gram.device)


def _original_rows(original: nn.Module, selection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (weight, bias) of the original layer's output channels the pruned layer stands for:
    `selection` is an index per kept channel, or a k x n map mixing the original rows (fused rows)."""
    weight = original.weight.detach().double()
    bias = original.bias.detach().double() if original.bias is not None else \
        torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    if selection.is_floating_point():
        mix = selection.double()
        return torch.einsum("kn,n...->k...", mix, weight), mix @ bias
    return weight[selection], bias[selection]


def _refit_input(layer: nn.Module, original: nn.Module, origin: torch.Tensor, pruned_in: torch.Tensor,
                original_in: torch.Tensor, ridge: float, intercept: bool) -> float:
    """Refit a (non-grouped) Conv/Linear: new weight = original rows of the kept outputs with the
    input map M applied, M the ridge least-squares map from the pruned input to the original input."""
    channel_dim = -1 if isinstance(layer, nn.Linear) else 1
    k, n = pruned_in.shape[channel_dim], original_in.shape[channel_dim]
    dim = k + int(intercept)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=pruned_in.device)
    cross = torch.zeros(dim, n, dtype=torch.float64, device=pruned_in.device)
    total = 0.0
    per_image = (k + n) * 8 * (pruned_in[0].numel() // max(1, k))
    for a, b in zip(_chunks(pruned_in, per_image), _chunks(original_in, per_image)):
        a, b = _as_rows(a, layer).double(), _as_rows(b, layer).double()
        if intercept:
            a = torch.cat([a, a.new_ones(1, a.shape[1])])
        gram += a @ a.t()
        cross += a @ b.t()
        total += float((b ** 2).sum())
    mix = _solve(gram, cross, ridge, intercept)  # dim x n
    # fraction of the original input's energy the map reproduces: 1 - |X - M^T X'|^2 / |X|^2
    residual = total - 2 * float((mix * cross).sum()) + float((mix * (gram @ mix)).sum())
    explained = 1.0 - residual / total if total > 0 else 1.0
    weight, bias = _original_rows(original, origin)  # out x n x ...
    new_weight = torch.einsum("on...,kn->ok...", weight, mix[:k])
    if intercept:
        bias = bias + weight.flatten(2).sum(2) @ mix[k] if weight.dim() > 2 else bias + weight @ mix[k]
    _set_parameters(layer, new_weight, bias)
    return explained


_GRAM_BLOCK = 512  # rows per block of the Gram matrix: only blocks on and below the diagonal are computed


def _add_lower_gram(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """gram += rows^T rows (float64), computing only the blocks on and below the diagonal (the product's
    cost nearly halves for wide layers; _mirror_lower fills the rest once at the end)."""
    for start in range(0, rows.shape[1], _GRAM_BLOCK):
        end = min(start + _GRAM_BLOCK, rows.shape[1])
        gram[start:end, :end] += (rows[:, start:end].t() @ rows[:, :end]).double()


def _mirror_lower(gram: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is gram's."""
    lower = gram.tril()
    return lower + lower.tril(-1).t()


def _squares(x: torch.Tensor) -> float:
    """Sum of squares, accumulated per column in the tensor's precision and across columns in float64."""
    return float((x * x).sum(0).double().sum())


def _output_fit_samples(layer: nn.Module, pruned_in: torch.Tensor, allowance: float,
                        memory_budget: int | None) -> tuple[int, str]:
    """How many samples (images, or rows of tokens) the output-space fit of `layer` reads, chosen so
    that its cost is bounded by design: building the Gram matrix (features^2 multiply-adds per
    position) and solving it may take at most `allowance` multiply-adds, and its matrices must fit in
    `memory_budget` bytes. Returns (0, why) when that leaves fewer than RECONSTRUCT_MIN_POSITIONS
    positions per feature: the layer then gets the input-space channel map instead (its features are
    channels, not channels x kernel)."""
    size = layer.weight[0].numel() + 1
    per_sample = positions_per_sample(layer, pruned_in)
    total = samples_of(layer, pruned_in).shape[0] * per_sample
    gram_bytes = 3 * size * size * 8  # the Gram matrix, the regularised system and its factor, float64
    if memory_budget is not None and gram_bytes > memory_budget:
        return 0, f"its {size}^2 Gram matrices ({gram_bytes / 2 ** 20:.0f} MiB) exceed memory_budget"
    positions = int(min(total, RECONSTRUCT_POSITIONS, RECONSTRUCT_POSITIONS_PER_FEATURE * size,
                        (allowance - size ** 3 / 3) / size ** 2))
    if positions < min(total, RECONSTRUCT_MIN_POSITIONS * size):
        return 0, f"an output-space fit over {size} features exceeds the cost allowance"
    return -(-positions // per_sample), ""


def _sample_parts(count: int, chosen: int, step: int, generator):
    """Index ranges (slices) or index tensors of `chosen` of `count` samples, `step` at a time."""
    if chosen >= count:
        return [slice(i, i + step) for i in range(0, count, step)]
    return list(torch.randperm(count, generator=generator)[:chosen].sort().values.split(step))


def _refit_output(layer: nn.Module, original: nn.Module, origin: torch.Tensor, pruned_in: torch.Tensor,
                  original_in: torch.Tensor, ridge: float, intercept: bool, generator, samples: int) -> float:
    """Refit a (non-grouped) Conv1d/Conv2d/Linear in output space: the weight W' (and bias) minimising
    |U' W'^T + b - U W^T|^2 + lambda |W' - W0|^2, U and U' the patches (one row per output position)
    the layer reads in the original and the pruned model, at every position of `samples` samples
    drawn once for both sides; W the original rows of the kept outputs (`origin`, as in _refit_input),
    W0 the layer's weight as pruning and fusion left it. The ridge pulls towards W0, not towards zero,
    and the fit is solved for the change W' - W0 from residuals, so a layer whose inputs did not
    change keeps its weights exactly. U W^T is one convolution of the original input (its patches are
    never formed)."""
    weight, bias = _original_rows(original, origin)
    current = weight_rows(layer, layer.weight.detach())
    target_weight = weight.to(original_in.dtype)
    size = current.shape[1]
    dim = size + int(intercept)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=current.device)
    cross = torch.zeros(dim, len(weight), dtype=torch.float64, device=current.device)
    total = before = 0.0
    pruned_in, original_in = samples_of(layer, pruned_in), samples_of(layer, original_in)
    per_sample = 4 * positions_per_sample(layer, pruned_in) * (dim + 2 * len(weight))
    offset = None
    for part in _sample_parts(len(pruned_in), samples, max(1, _GRAM_CHUNK_BYTES // per_sample), generator):
        if isinstance(part, torch.Tensor):
            part = part.to(pruned_in.device)
        a = patch_rows(layer, pruned_in[part])  # positions x features
        target = output_rows(layer, original_in[part], target_weight)  # positions x outputs
        # products in the layer's precision over one chunk, sums over chunks in float64; the
        # intercept is a constant extra input (its rows of the Gram matrices are sums)
        residual = target - a @ current.t()
        if intercept:
            # with an intercept, inputs may be measured from any offset: from their mean in the first
            # chunk, the float32 products keep their precision where inputs sit far from zero (e.g.
            # after a ReLU and a BatchNorm shift), the solution no longer depends on how the products
            # are split across threads, and the ridge scales with the inputs' spread, not their offset
            offset = a.mean(0) if offset is None else offset
            a = a - offset
        _add_lower_gram(gram[:size, :size], a)
        cross[:size] += (a.t() @ residual).double()
        if intercept:
            gram[size, :size] += a.sum(0).double()
            gram[size, size] += a.shape[0]
            cross[size] += residual.sum(0).double()
        total += _squares(target)
        before += _squares(residual)
    gram = _mirror_lower(gram)
    change = _solve(gram, cross, ridge, intercept)  # dim x out
    after = before - 2 * float((change * cross).sum()) + float((change * (gram @ change)).sum())
    explained = 1.0 - after / total if total > 0 else 1.0
    if intercept:  # the intercept was fitted for inputs measured from the offset
        bias = bias + change[-1] - change[:size].t() @ offset.double()
    new_weight = current.double() + change[:size].t()
    _set_parameters(layer, rows_to_weight(layer, new_weight), bias)
    return explained


def _refit_depthwise(layer: nn.Conv2d, original: nn.Module, origin: torch.Tensor, pruned_in: torch.Tensor,
                     original_in: torch.Tensor, ridge: float, intercept: bool) -> float:
    """Depthwise conv: each channel reads only itself, so each gets its own scale (and shift)."""
    stats = torch.zeros(5, pruned_in.shape[1], dtype=torch.float64, device=pruned_in.device)  # sum a^2, sum a, sum a*b, sum b, sum b^2
    count = 0
    for a, b in zip(pruned_in.split(64), original_in.split(64)):
        a, b = _as_rows(a, layer).double(), _as_rows(b, layer).double()[origin]
        stats += torch.stack([(a * a).sum(1), a.sum(1), (a * b).sum(1), b.sum(1), (b * b).sum(1)])
        count += a.shape[1]
    saa, sa, sab, sb, sbb = stats
    lam = ridge * saa.mean().clamp_min(1e-12)
    # ridge towards scale 1 (the original rows), as in _solve
    if intercept:  # solve [[saa + lam, sa], [sa, count]] [s, c] = [sab + lam, sb] per channel
        det = (saa + lam) * count - sa ** 2
        scale = torch.where(det > 0, ((sab + lam) * count - sa * sb) / det.clamp_min(1e-300), torch.ones_like(saa))
        shift = (sb - scale * sa) / count
    else:
        scale, shift = (sab + lam) / (saa + lam), torch.zeros_like(saa)
    residual = sbb - 2 * (scale * sab + shift * sb) + scale ** 2 * saa + 2 * scale * shift * sa + shift ** 2 * count
    explained = 1.0 - float(residual.sum() / sbb.sum()) if float(sbb.sum()) > 0 else 1.0
    weight, bias = _original_rows(original, origin)
    bias = bias + weight.flatten(1).sum(1) * shift
    _set_parameters(layer, weight * scale.view((-1,) + (1,) * (weight.dim() - 1)), bias)
    return explained


@torch.no_grad()
def _set_parameters(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    layer.weight.copy_(weight.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and \
        layer.groups == layer.in_channels == layer.out_channels


def fused_row_maps(original: nn.Module, results) -> dict[str, torch.Tensor]:
    """For each producer of a fused group: the k x n map that made its kept rows from its original
    rows (given to repair_by_reconstruction, the refit then aims at the fused channels instead of the
    original channels that were kept). Layers pruned more than once are left out."""
    modules, maps = dict(original.named_modules()), {}
    for result in results:
        if result.producer_map is None:
            continue
        for name in result.producers:
            if name in modules and out_channels(modules[name]) == result.channels:
                maps[name] = result.producer_map
    return maps


def _refit(layer, original, rows, origin, pruned_in, original_in, ridge, intercept, space, generator,
           allowance, memory_budget) -> dict:
    """Refit one layer (see repair_by_reconstruction); returns how, the fraction explained and, for a
    layer that falls back from the output space to the input space, why."""
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1:
        if not _is_depthwise(layer):
            return {"mode": "skipped (grouped convolution)"}
        return {"mode": "per_channel",
                "explained": _refit_depthwise(layer, original, origin, pruned_in, original_in, ridge, intercept)}
    why = ""
    if space == "output" and isinstance(layer, PATCH_TYPES):
        samples, why = _output_fit_samples(layer, pruned_in, allowance, memory_budget)
        if samples:
            return {"mode": "output", "explained": _refit_output(layer, original, rows, pruned_in, original_in,
                                                                 ridge, intercept, generator, samples)}
    explained = _refit_input(layer, original, rows, pruned_in, original_in, ridge, intercept)
    return {"mode": "input", "explained": explained, **({"why": why} if why else {})}


class _OriginalSide:
    """Runs the original model in a thread and hands over each named layer's input, one at a time:
    the thread waits until the pruned side has used an input, so nothing is copied or held twice."""

    def __init__(self, model: nn.Module, names: list[str], inputs: torch.Tensor):
        self.handoff, self.resume = queue.Queue(maxsize=1), queue.Queue()
        self.stopped, self.error = False, None
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_pre_hook(self._offer(name), with_kwargs=True)
                        for name in names]
        self.thread = threading.Thread(target=self._run, args=(model, inputs), daemon=True)
        self.offered: set[str] = set()

    def _offer(self, name):
        def offer(_, args, kwargs):
            if name in self.offered:
                return None
            self.offered.add(name)
            self.handoff.put((name, args[0] if args else next(iter(kwargs.values()))))
            self.resume.get()
            if self.stopped:
                raise _Stop
            return None
        return offer

    def _run(self, model, inputs):
        try:
            with torch.no_grad():
                model(inputs)
        except _Stop:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            self.error = error
        finally:
            self.handoff.put((None, None))

    def take(self, name: str) -> torch.Tensor:
        got, tensor = self.handoff.get()
        if got is None:
            raise RuntimeError(f"the original model stopped before layer {name}"
                               + (f": {self.error}" if self.error else ""))
        if got != name:
            raise RuntimeError(f"layer order differs between the models: original ran {got}, pruned ran {name}")
        return tensor

    def release(self) -> None:
        self.resume.put(True)

    def close(self) -> None:
        self.stopped = True
        while self.thread.is_alive():
            self.resume.put(True)
            try:
                self.handoff.get(timeout=0.05)
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def repair_by_reconstruction(original: nn.Module, pruned: nn.Module, channel_origin: dict[str, torch.Tensor],
                             inputs: torch.Tensor, ridge: float = RECONSTRUCT_RIDGE, intercept: bool = True,
                             space: str = "output", skip=(), seed: int = 0,
                             row_maps: dict[str, torch.Tensor] | None = None,
                             cost: float = RECONSTRUCT_COST, memory_budget: int | None = None) -> dict[str, dict]:
    """Refit every Conv/Linear layer of `pruned` (in place) so that, from the pruned model's own inputs,
    it reproduces what the same layer of `original` outputs for the channels it keeps.

    space="output" (default): the weight W' and bias minimising |W' U' + b - W U|^2 + lambda |W' - W0|^2
    over sampled output positions, U / U' the patches the layer reads in the original / pruned model,
    W the original rows of the channels it keeps (`channel_origin`; or, per layer in `row_maps`, a
    k x n mix of original rows, e.g. fused_row_maps), W0 the layer as pruning left it. space="input":
    the cheaper channel map M minimising |X - M^T X'|^2 + lambda |M|^2 on the layer inputs, applied to
    the input side of W (the data-driven counterpart of a transport map).
    One forward pass: the original model runs in a thread beside the pruned one and hands over each
    layer's input; each layer is refitted before it runs, so its corrected output feeds the next.
    Only Gram matrices are kept (float64 sums over chunks). Depthwise convolutions get a scale and
    shift per channel; other grouped convolutions and the layers in `skip` are left as they are.
    Returns, per layer, how it was refitted and the fraction of its target's energy the fit explains.
    """
    check_choice(space, RECONSTRUCT_SPACES, "reconstruction space")
    generator = torch.Generator().manual_seed(seed)
    layers = {name: module for name, module in pruned.named_modules()
              if isinstance(module, ROOT_TYPES)}
    reference = dict(original.named_modules())
    names = [name for name in layers if name not in skip and name in reference]
    inputs = as_fast_input(inputs, inputs.device)  # channels_last: oneDNN's fastest CPU convolutions
    with eval_mode(original), eval_mode(pruned), fast_layout(original), fast_layout(pruned):
        order, macs = _run_order(original, names, inputs[:1])
        # each layer's output-space fit may cost `cost` x (its own forward + an even share of the model's)
        share = sum(macs.values()) / max(1, len(order))
        allowance = {name: max(_FREE_MACS, cost * len(inputs) * (macs.get(name, 0) + share)) for name in order}
        report: dict[str, dict] = {}
        side = _OriginalSide(original, order, inputs)
        pending = set(order)

        def refit(name):
            def hook(layer, args, kwargs):
                if name not in pending:
                    return None
                pending.discard(name)
                original_in = side.take(name)
                try:
                    pruned_in = args[0] if args else next(iter(kwargs.values()))
                    origin = channel_origin.get(name, torch.arange(out_channels(layer)))
                    report[name] = _refit(layer, reference[name], (row_maps or {}).get(name, origin), origin,
                                          pruned_in, original_in, ridge, intercept, space, generator,
                                          allowance[name], memory_budget)
                finally:
                    side.release()
                if not pending:
                    raise _Stop
                return None
            return hook

        handles = [layers[name].register_forward_pre_hook(refit(name), with_kwargs=True) for name in order]
        side.thread.start()
        try:
            pruned(inputs)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
            side.close()
    return report
