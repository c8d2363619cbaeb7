"""Sparsity learned during training, attached as weight parametrizations and folded away after.

- Channel/connection gates (a self-pruning network): weight * sigmoid(score); the loss adds
  lambda * sum(sigmoid(scores)). Folding multiplies the gates into the weights (same function);
  the learned channel gates are kept as the importance criterion "gate". A channel gate of a layer
  followed by its own BatchNorm scales that BN's weight and bias instead: in front of a BN a gate is
  normalised away in training, so the penalty would shrink every gate alike at no cost.
- Adaptive sparsity loss (Retsinas et al., ICIP 2021): one trainable magnitude threshold per large
  layer; weights below it are zeroed in the forward pass (straight-through estimator); the layer's
  sparsity is modelled from the mean and std of its weights with the error function and pushed
  towards a target, per layer ("fixed") or as a parameter-weighted budget ("adaptive").
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from ..bn_folding import foldable_pairs
from ..groups import ROOT_TYPES, trace_graph
from ..checks import check_choice

PRUNABLE = ROOT_TYPES
ASL_MODES = ("fixed", "adaptive")


class Gate(nn.Module):
    """weight * sigmoid(scores); scores per output channel (structured) or per weight."""

    def __init__(self, weight: torch.Tensor, per_channel: bool, initial: float = 3.0, owner: str | None = None):
        super().__init__()
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1) if per_channel else weight.shape
        self.per_channel = per_channel
        self.owner = owner  # the gated Conv/Linear when the gate sits on its BatchNorm
        self.scores = nn.Parameter(torch.full(shape, float(initial), dtype=weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * torch.sigmoid(self.scores)


def gated_layers(model: nn.Module, ignored=()) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE) and m not in ignored]


def add_gates(model: nn.Module, structured: bool = True, ignored=(), initial: float = 3.0,
              example_inputs=None) -> list[nn.Parameter]:
    """Attach gates to every Conv/Linear (except `ignored`); returns the gate scores.

    With `example_inputs`, a channel gate of a layer that feeds only its own BatchNorm is put on
    that BN's weight and bias (the channel's output after normalisation), where it cannot be undone.
    """
    batchnorm_of = {}
    if structured and example_inputs is not None:
        graph = trace_graph(model, example_inputs)
        batchnorm_of = dict(foldable_pairs(graph))
    scores = []
    for name, layer in gated_layers(model, ignored):
        bn = batchnorm_of.get(layer)
        if bn is not None and bn.affine:
            gate = Gate(bn.weight, per_channel=True, initial=initial, owner=name)
            parametrize.register_parametrization(bn, "weight", gate)
            parametrize.register_parametrization(bn, "bias", gate)
        else:
            gate = Gate(layer.weight, per_channel=structured, initial=initial)
            parametrize.register_parametrization(layer, "weight", gate)
        scores.append(gate.scores)
    return scores


def _gates(model: nn.Module):
    for name, layer in model.named_modules():
        if parametrize.is_parametrized(layer, "weight"):
            for p in layer.parametrizations.weight:
                if isinstance(p, Gate):
                    yield p.owner or name, layer, p


def gate_penalty(model: nn.Module) -> torch.Tensor:
    """sum over all gates of sigmoid(score)."""
    return sum(torch.sigmoid(g.scores).sum() for _, _, g in _gates(model))


def gate_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """sigmoid(score) per gated layer (flattened per output channel for channel gates)."""
    return {name: torch.sigmoid(g.scores.detach()).flatten() if g.per_channel else torch.sigmoid(g.scores.detach())
            for name, _, g in _gates(model)}


def fold_parametrizations(model: nn.Module) -> None:
    """Replace every weight/bias parametrization by its current value: a plain model, same function."""
    for layer in list(model.modules()):
        for tensor in ("weight", "bias"):
            if parametrize.is_parametrized(layer, tensor):
                parametrize.remove_parametrizations(layer, tensor, leave_parametrized=True)


class MagnitudeThreshold(nn.Module):
    """Zero weights with |w| below a trainable threshold (straight-through gradient for w)."""

    def __init__(self, initial: float = 1e-4):  # not 0: |t| has no gradient there
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(initial)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = (weight.abs() > self.threshold.abs()).to(weight.dtype)
        return weight + (weight * mask - weight).detach()


def add_thresholds(model: nn.Module, pthres: int = 1000) -> list[tuple[nn.Module, MagnitudeThreshold]]:
    """A trainable threshold for every Conv/Linear with at least `pthres` weights."""
    if pthres < 0:
        raise ValueError(f"pthres must be non-negative, got {pthres!r}")
    attached = []
    for layer in model.modules():
        if isinstance(layer, PRUNABLE) and layer.weight.numel() >= pthres:
            threshold = MagnitudeThreshold()
            parametrize.register_parametrization(layer, "weight", threshold)
            attached.append((layer, threshold))
    return attached


def modelled_sparsity(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """P(|w| < t) for w ~ N(mean, std) of the layer's weights: differentiable in t."""
    mean, std = weight.mean(), weight.std().clamp_min(1e-12)
    t = threshold.abs()
    upper = torch.erf((t - mean) / (std * math.sqrt(2)))
    lower = torch.erf((-t - mean) / (std * math.sqrt(2)))
    return 0.5 * (upper - lower)


def sparsity_loss(attached, target: float, mode: str = "adaptive") -> torch.Tensor:
    """Squared distance of the modelled sparsity to `target`: per layer ("fixed") or for the
    parameter-weighted total ("adaptive", layers may differ as long as the budget is met)."""
    check_choice(mode, ASL_MODES, "sparsity-loss mode")
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must be in [0, 1), got {target!r}")
    levels = [modelled_sparsity(layer.parametrizations.weight.original.detach(), t.threshold)
              for layer, t in attached]
    if mode == "fixed":
        return sum((s - target) ** 2 for s in levels) / len(levels)
    sizes = torch.tensor([float(layer.weight.numel()) for layer, _ in attached])
    total = sum(s * n for s, n in zip(levels, sizes)) / sizes.sum()
    return (total - target) ** 2


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights per Conv/Linear layer (after folding)."""
    return {name: float((m.weight == 0).float().mean()) for name, m in model.named_modules()
            if isinstance(m, PRUNABLE)}
