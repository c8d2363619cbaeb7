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
"""
from __future__ import annotations

import torch
import torch.nn as nn

REPAIR_MODES = ("none", "data", "data_downstream", "datafree")
DATA_MODES = ("data", "data_downstream")  # the modes that need unlabelled images
_EPS = 1e-8


def check_mode(mode: str) -> None:
    if mode not in REPAIR_MODES:
        raise ValueError(f"unknown repair mode {mode!r}; choose one of: {', '.join(REPAIR_MODES)}")


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


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
    was_training = model.training
    model.eval()
    try:
        for start in range(0, inputs.shape[0], batch_size):
            model(inputs[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: _mean_std(*sums[name]) for name in names if name in sums}


@torch.no_grad()
def apply_affine(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make the layer output `scale * y + shift` per output channel (folded into weight and bias)."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(scale.view(shape).to(layer.weight.dtype))
    bias = layer.bias if layer.bias is not None else torch.zeros(_out_channels(layer), dtype=layer.weight.dtype)
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
            origin = channel_origin.get(name, torch.arange(_out_channels(layer)))
            apply_affine(layer, *_correction(mean_p, std_p, reference[name][0][origin], reference[name][1][origin]))
            if len(repaired) == len(reference):
                raise _AllRepaired
            return layer.forward(*args, **kwargs)  # the corrected layer's output (forward() skips the hooks)
        return correct

    handles = [modules[name].register_forward_hook(hook(name), with_kwargs=True) for name in reference]
    was_training = pruned.training
    pruned.eval()
    try:
        pruned(inputs)
    except _AllRepaired:
        pass
    finally:
        for handle in handles:
            handle.remove()
        pruned.train(was_training)


def _folded_channel_stats(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of a BN's output in the original model, from its running statistics."""
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(gamma)
    var = bn.running_var.double()
    return beta, gamma.abs() * torch.sqrt(var / (var + bn.eps))


def repair_without_data(original_unfolded: nn.Module, original_folded: nn.Module, pruned: nn.Module,
                        results, channel_origin: dict[str, torch.Tensor], bn_of: dict[str, str]) -> None:
    """Data-free repair of fused producers: predict each fused channel's mean/std from the original
    BN statistics and the producer map (correlations estimated by the cosine similarity of the
    channels' weight rows), and correct it to the statistics of the channel it stands for."""
    unfolded, folded = dict(original_unfolded.named_modules()), dict(original_folded.named_modules())
    current = dict(pruned.named_modules())
    for result in results:
        if result.producer_map is None:
            continue
        for name in result.producers:
            if name not in bn_of:
                continue
            mean, std = _folded_channel_stats(unfolded[bn_of[name]])
            rows = folded[name].weight.detach().double().flatten(1)
            unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(_EPS)
            correlation = unit @ unit.t()
            origin = channel_origin.get(name, torch.arange(len(mean)))
            # the map acts on the channels present before this group was pruned: restrict to them
            before = _origin_before(result, origin, len(mean))
            mix = result.producer_map.double()
            mean_p = mix @ mean[before]
            cov = correlation[before][:, before] * torch.outer(std[before], std[before])
            std_p = torch.einsum("ji,ik,jk->j", mix, cov, mix).clamp_min(0).sqrt()
            scale, shift = _correction(mean_p, std_p, mean[origin], std[origin])
            apply_affine(current[name], scale, shift)


def _origin_before(result, origin_after: torch.Tensor, original_count: int) -> torch.Tensor:
    """Original indices of the channels a group saw, given those left after it (kept in order)."""
    if result.channels == original_count:
        return torch.arange(original_count)
    raise ValueError("data-free repair needs each layer pruned at most once")
