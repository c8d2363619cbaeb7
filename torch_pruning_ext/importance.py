"""Importance criteria by name (SPEC section 4), plus any torch-pruning Importance object.

Data-driven criteria (taylor, chip) implement ``prepare(model, group, batches)``, which the pruner
calls right before scoring each group, so the scores see the model as already pruned so far.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch_pruning.pruner import function as fn

CRITERIA = ("l1", "l2", "linf", "taylor", "lamp", "random", "chip")
_WEIGHTED = [nn.modules.conv._ConvNd, nn.Linear]


class LinfImportance(tp.importance.GroupMagnitudeImportance):
    """Largest absolute weight of each channel's rows/columns, averaged over members, / mean."""

    def __init__(self):
        super().__init__(p=1, group_reduction="mean", normalizer="mean", target_types=_WEIGHTED)

    @torch.no_grad()
    def __call__(self, group):
        scores, roots = [], []
        for item in group.items:
            layer, prune_fn = item.dep.layer, item.dep.pruning_fn
            if not isinstance(layer, tuple(self.target_types)) or getattr(layer, "transposed", False):
                continue
            if prune_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
                scores.append(layer.weight.data[item.idxs].flatten(1).abs().amax(1))
            elif prune_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels):
                columns = layer.weight.data.transpose(0, 1).flatten(1).abs().amax(1)
                if prune_fn == fn.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
                    columns = columns.repeat(layer.groups)
                scores.append(columns[item.idxs])
            else:
                continue
            roots.append(item.root_idxs)
        if not scores:
            return None
        return self._normalize(self._reduce(scores, roots), self.normalizer)


class TaylorImportance(tp.importance.GroupTaylorImportance):
    """|w * dL/dw| with gradients accumulated over calibration batches, model in eval mode."""
    needs_data = True

    def __init__(self):
        super().__init__(group_reduction="mean", normalizer="mean", target_types=_WEIGHTED)

    def prepare(self, model: nn.Module, group, batches) -> None:
        was_training = model.training
        model.eval()
        model.zero_grad(set_to_none=True)
        device = next(model.parameters()).device
        for inputs, labels in batches:
            F.cross_entropy(model(inputs.to(device)), labels.to(device)).backward()
        model.train(was_training)

    def __call__(self, group):
        for item in group.items:
            layer = item.dep.layer
            if isinstance(layer, tuple(self.target_types)) and layer.weight.grad is None:
                raise RuntimeError("taylor importance needs gradients: pass calibration batches")
        return super().__call__(group)


class ChipImportance(tp.importance.Importance):
    """Channel independence (CHIP, Sui et al. 2021) of the group's output feature maps.

    For each image, a channel's score is how much the nuclear norm of the (channels x pixels)
    feature-map matrix drops when that channel's row is zeroed; scores are averaged over the
    calibration images and over the group's producing layers.
    """
    needs_data = True

    def __init__(self):
        self._scores: torch.Tensor | None = None

    @torch.no_grad()
    def prepare(self, model: nn.Module, group, batches) -> None:
        producers = [(item.dep.layer, item.root_idxs, item.idxs) for item in group.items
                     if item.dep.pruning_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels)]
        n = len(group[0].idxs)
        maps: dict[nn.Module, list[torch.Tensor]] = {layer: [] for layer, _, _ in producers}
        hooks = [layer.register_forward_hook(lambda m, i, o: maps[m].append(o.detach().float().cpu()))
                 for layer in maps]
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            for inputs, _ in batches:
                model(inputs.to(device))
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)
        total, count = torch.zeros(n, dtype=torch.float64), 0
        for layer, roots, idxs in producers:
            outputs = torch.cat(maps[layer])[:, idxs]
            features = outputs.flatten(2) if outputs.dim() > 2 else outputs.unsqueeze(-1)
            total.index_add_(0, torch.tensor(roots), channel_independence(features))
            count += 1
        self._scores = (total / max(count, 1)).float()

    def __call__(self, group):
        if self._scores is None:
            raise RuntimeError("chip importance needs feature maps: pass calibration batches")
        scores, self._scores = self._scores, None
        return scores


def channel_independence(features: torch.Tensor) -> torch.Tensor:
    """Mean over images of ||A||_* - ||A with row c zeroed||_* for feature maps A (N, C, pixels)."""
    _, channels, _ = features.shape
    keep = 1.0 - torch.eye(channels, dtype=torch.float64)
    total = torch.zeros(channels, dtype=torch.float64)
    for image in features.double():
        full = torch.linalg.svdvals(image).sum()
        masked = torch.linalg.svdvals(keep.unsqueeze(-1) * image.unsqueeze(0)).sum(dim=1)
        total += full - masked
    return total / features.shape[0]


def build_importance(criterion) -> tp.importance.Importance:
    """An importance object for a criterion name, or the torch-pruning Importance given."""
    if isinstance(criterion, tp.importance.Importance):
        return criterion
    builders = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="mean",
                                                             target_types=_WEIGHTED),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean",
                                                             target_types=_WEIGHTED),
        "linf": LinfImportance,
        "taylor": TaylorImportance,
        "lamp": tp.importance.LAMPImportance,
        "random": tp.importance.RandomImportance,
        "chip": ChipImportance,
    }
    if criterion not in builders:
        raise ValueError(f"unknown importance criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}, "
                         "or pass a torch_pruning.importance.Importance object")
    return builders[criterion]()


def needs_data(importance) -> bool:
    return bool(getattr(importance, "needs_data", False))
