"""Fold BatchNorm into the Conv/Linear that feeds it (the paper's ``merge_bn``).

After folding, every channel's scale lives in the weights, so magnitude importance and the
transport cost see the channel as the network uses it. The BN stays in the graph as an identity
(eval mode), which keeps module names and torch-pruning's groups unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from .groups import out_channels, trace_graph
from .checks import check_choice
from .standard_layers import set_bias

FOLD_MODES = ("exact", "reference")
_FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class FoldedPair:
    """A BatchNorm folded into `layer`; with `activation`, a BN after that activation whose scale
    was moved back through it (the BN keeps its shift and sign)."""
    layer: str
    batchnorm: str
    activation: str | None = None


def foldable_pairs(graph: tp.DependencyGraph) -> list[tuple[nn.Module, nn.Module]]:
    """(layer, bn) pairs where the BN's only input is the layer and the layer feeds only that BN."""
    pairs = []
    for module, node in graph.module2node.items():
        if not isinstance(module, _BATCHNORMS) or len(node.inputs) != 1:
            continue
        producer = node.inputs[0]
        layer = producer.module
        if (isinstance(layer, _FOLDABLE_LAYERS) and not getattr(layer, "transposed", False)
                and len(producer.outputs) == 1 and out_channels(layer) == module.num_features):
            pairs.append((layer, module))
    return pairs


@torch.no_grad()
def fold_batchnorm_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, mode: str = "exact") -> None:
    """Fold one BN into `layer` and reset the BN to identity.

    "exact" uses sqrt(var + eps) and resets var to 1 - eps, so eval-mode outputs are unchanged.
    "reference" reproduces the released code: sqrt(var) without eps, var reset to 1.
    """
    check_choice(mode, FOLD_MODES, "BatchNorm fold mode")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {bn}: it tracks no running statistics")
    variance = bn.running_var + bn.eps if mode == "exact" else bn.running_var
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    scale = gamma / torch.sqrt(variance)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(scale.view(shape).to(layer.weight.dtype))
    old_bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (old_bias - bn.running_mean) * scale + beta
    set_bias(layer, new_bias)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps if mode == "exact" else 1.0)
    if bn.affine:
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def _homogeneous(node) -> str | None:
    """The name of a traced activation that is positively homogeneous (f(a x) = a f(x), a > 0):
    ReLU or LeakyReLU, as a module or a function (torch-pruning records both as element-wise ops)."""
    module = node.module
    grad_fn = str(getattr(module, "_grad_fn", "")) if isinstance(module, tp.ops._ElementWiseOp) else ""
    return {"LeakyRelu": "LeakyReLU", "Relu": "ReLU"}.get(grad_fn.split("Backward")[0])


def post_activation_chains(graph: tp.DependencyGraph) -> list[tuple[nn.Module, str, nn.Module]]:
    """(layer, activation, bn) for each affine BN whose only input is a ReLU/LeakyReLU whose only
    input is a Conv1d/Conv2d/Linear, each feeding only the next (conv -> ReLU -> BN layouts)."""
    chains = []
    for module, node in graph.module2node.items():
        if not isinstance(module, _BATCHNORMS) or not module.affine or len(node.inputs) != 1:
            continue
        act = node.inputs[0]
        activation = _homogeneous(act)
        if activation is None or len(act.outputs) != 1 or len(act.inputs) != 1:
            continue
        producer = act.inputs[0]
        layer = producer.module
        if (isinstance(layer, _FOLDABLE_LAYERS) and not getattr(layer, "transposed", False)
                and len(producer.outputs) == 1 and out_channels(layer) == module.num_features):
            chains.append((layer, activation, module))
    return chains


@torch.no_grad()
def scale_through_activation(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, mode: str = "exact") -> None:
    """Move the magnitude of a post-activation BN's scale into `layer` (through the positively
    homogeneous activation between them); the BN keeps only its shift and the scale's sign, so
    eval-mode outputs are unchanged ("exact", to 1e-5) and the layer's rows carry each channel's
    real size, as folding gives them for BN right after a layer."""
    check_choice(mode, FOLD_MODES, "BatchNorm fold mode")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {bn}: it tracks no running statistics")
    variance = bn.running_var + bn.eps if mode == "exact" else bn.running_var
    scale = bn.weight / torch.sqrt(variance)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(scale.abs().view(shape).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.mul_(scale.abs().to(layer.bias.dtype))
    bn.bias.sub_(scale * bn.running_mean)
    bn.weight.copy_(torch.where(scale < 0, -1.0, 1.0).to(bn.weight.dtype))
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps if mode == "exact" else 1.0)


def fold_batchnorms(model: nn.Module, example_inputs, mode: str = "exact",
                    graph: tp.DependencyGraph | None = None) -> list[FoldedPair]:
    """Fold every foldable BN of `model` in place; returns the (layer, bn) names that were folded.

    A BN is folded only when its single input is a Conv1d/Conv2d/Linear feeding nothing else, so a
    BN after a residual addition or a pre-activation BN is left alone. A BN after a ReLU/LeakyReLU
    that follows such a layer (conv -> ReLU -> BN) gives its scale's magnitude to the layer and keeps
    its shift (pairs with `activation` set): fusion then compares and merges channels at the size the
    network uses them, and the BN's shifts are merged as per-channel parameters.
    """
    check_choice(mode, FOLD_MODES, "BatchNorm fold mode")
    if graph is None:
        graph = trace_graph(model, example_inputs)
    names = {module: name for name, module in model.named_modules()}
    folded = []
    for layer, bn in foldable_pairs(graph):
        fold_batchnorm_into(layer, bn, mode)
        folded.append(FoldedPair(names[layer], names[bn]))
    for layer, activation, bn in post_activation_chains(graph):
        scale_through_activation(layer, bn, mode)
        folded.append(FoldedPair(names[layer], names[bn], activation))
    return folded


def is_channel_uniform(bn: nn.Module) -> bool:
    """True when a BN scales every channel alike and shifts none (eval mode), e.g. after folding.

    Such a BN commutes with mixing channels, so fusion may simply slice it.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return False
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    shift = beta - bn.running_mean * scale
    return bool(torch.all(scale == scale[0]) and torch.all(shift == 0))
