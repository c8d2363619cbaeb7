"""Layers as torch-pruning expects them, before and after pruning.

Hugging Face's GPT-2 family computes x @ W + b with a `Conv1D` whose weight is stored (in, out):
torch-pruning does not know it and would leave every such layer (attention and MLP) unpruned. An
nn.Linear holding the transposed weight computes exactly the same.

Tied weights (an input embedding that is also the output head) become two tensors when torch-pruning
slices each module; where pruning left them equal they are tied again (`retie`).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _is_transposed_linear(module: nn.Module) -> bool:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1] and (bias is None or bias.shape == (weight.shape[1],))
            and not list(module.children()))


@torch.no_grad()
def replace_transposed_linears(model: nn.Module) -> list[str]:
    """Swap every GPT-2-style Conv1D of `model` (in place) for an equal nn.Linear; returns their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not _is_transposed_linear(module):
            continue
        weight, bias = module.weight, module.bias
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
        linear.weight.copy_(weight.t())
        linear.weight.requires_grad_(weight.requires_grad)
        if bias is not None:
            linear.bias.copy_(bias)
            linear.bias.requires_grad_(bias.requires_grad)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced.append(name)
    return replaced


def tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, parameter name) of every parameter that several modules share."""
    owners: dict[int, list] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            owners.setdefault(id(parameter), []).append((module, name))
    return [places for places in owners.values() if len(places) > 1]


@torch.no_grad()
def retie(ties: list[list[tuple[nn.Module, str]]]) -> int:
    """Share one tensor again between the places of each tie whose tensors are still equal (plain
    pruning slices both alike; a merge mixes them by different maps and they stay apart); returns how
    many ties were restored."""
    restored = 0
    for places in ties:
        first = getattr(*places[0])
        others = [getattr(module, name) for module, name in places[1:]]
        if all(other is first for other in others):
            continue
        if all(other.shape == first.shape and torch.equal(other, first) for other in others):
            for module, name in places[1:]:
                setattr(module, name, first)
            restored += 1
    return restored


@torch.no_grad()
def set_bias(layer: nn.Module, values: torch.Tensor) -> None:
    """Give a Conv/Linear layer the bias `values` (in its weight's dtype), creating one where it has none."""
    if layer.bias is None:
        layer.bias = nn.Parameter(values.to(layer.weight.dtype))
    else:
        layer.bias.copy_(values)
