"""Unstructured global magnitude pruning (Han et al. 2015) with torch.nn.utils.prune.

The smallest |w| over all Conv/Linear weights together are zeroed; the masks stay attached during
an optional retraining (so pruned weights stay zero) and prune.remove() makes the model plain.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.utils.prune as prune

from ..groups import ROOT_TYPES
from ..pruner import check_sparsity

PRUNABLE = ROOT_TYPES


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def global_magnitude_prune(model: nn.Module, sparsity: float) -> None:
    """Attach L1 masks removing `sparsity` of all Conv/Linear weights (exactly round(s * total))."""
    sparsity = check_sparsity(sparsity)
    prune.global_unstructured(prunable_weights(model), pruning_method=prune.L1Unstructured, amount=sparsity)


def make_permanent(model: nn.Module) -> None:
    """Fold the masks into the weights and drop the pruning re-parametrisation."""
    for module, name in prunable_weights(model):
        if prune.is_pruned(module) and hasattr(module, f"{name}_mask"):
            prune.remove(module, name)


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zero Conv/Linear weights."""
    weights = [getattr(m, name).detach() for m, name in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total
