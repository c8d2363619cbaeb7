"""Save a pruned model so that it loads back without the unpruned checkpoint.

The file holds the state dict and how to build the architecture (a name registered with
`register_builder`, or the caller's builder at load time). Loading builds the architecture, shrinks
every Conv/Linear/norm layer to the shapes in the state dict, restores the integer attributes of the
model's own modules (widths its forward() may read), and loads the weights: an exact copy,
as a plain nn.Module that can be pruned again.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .files import atomic_torch_save, check_writable_file
from .safety import integer_attributes

FORMAT = "torch_pruning_ext.pruned_model/1"


class NotAPrunedModel(ValueError):
    """The file is not a model saved by save_pruned."""


# name -> builder(num_classes) returning the unpruned architecture. The library registers nothing;
# projects (and this package's experiments layer) register their own names, so a saved file can name
# its architecture without the loader importing code the file chooses.
BUILDERS: dict = {}


def register_builder(name: str, builder) -> None:
    """Let save_pruned/load_pruned refer to `builder(num_classes)` by `name`."""
    if not callable(builder):
        raise TypeError(f"builder for {name!r} must be callable, got {type(builder).__name__}")
    BUILDERS[name] = builder


def save_pruned(model: nn.Module, path: str | Path, model_name: str | None = None, num_classes: int | None = None,
                metadata: dict | None = None) -> None:
    """Write `model` to `path` atomically. model_name/num_classes name a registered builder
    (register_builder); without them, load_pruned needs a `builder` returning the unpruned architecture."""
    if model_name is not None and model_name not in BUILDERS:
        raise ValueError(f"unknown model {model_name!r}; choose one of the registered builders "
                         f"({', '.join(BUILDERS) or 'none registered'}) or None")
    check_writable_file(path, "pruned model file")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save({"format": FORMAT, "model_name": model_name, "num_classes": num_classes,
                       "class": f"{type(model).__module__}.{type(model).__qualname__}",
                       "state_dict": state, "integer_attributes": integer_attributes(model),
                       "metadata": metadata or {}}, path)


def _resize(module: nn.Module, state: dict, prefix: str) -> None:
    """Give `module` the parameter/buffer shapes found in `state` and matching size attributes."""
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        key = prefix + name
        if key not in state or tensor is None or state[key].shape == tensor.shape:
            continue
        replacement = torch.empty_like(state[key], dtype=tensor.dtype)
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(replacement, requires_grad=tensor.requires_grad))
        else:
            setattr(module, name, replacement)
    if getattr(module, "bias", False) is None and prefix + "bias" in state:  # folding added a bias
        module.bias = nn.Parameter(torch.empty_like(state[prefix + "bias"]))
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            module.groups = weight.shape[0]  # depthwise: one group per remaining channel
        module.out_channels = weight.shape[1] * module.groups if module.transposed else weight.shape[0]
        module.in_channels = weight.shape[0] if module.transposed else weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = state.get(prefix + "running_mean", weight).shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
        module.head_dim = module.embed_dim // module.num_heads


def load_pruned(path: str | Path, builder=None, map_location="cpu") -> nn.Module:
    """Load a model written by save_pruned; `builder()` must return the unpruned architecture when
    the file names no registered builder."""
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise NotAPrunedModel(f"{path} is not a saved pruned model: cannot be read ({type(error).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise NotAPrunedModel(f"{path} is not a saved pruned model (no {FORMAT!r} format tag); "
                              "save one with torch_pruning_ext.save_pruned")
    if builder is not None:
        model = builder()
    elif saved["model_name"] in BUILDERS:
        model = BUILDERS[saved["model_name"]](saved["num_classes"])
    elif saved["model_name"] is not None:
        raise ValueError(f"{path} names the architecture {saved['model_name']!r}, which is not registered "
                         f"(registered: {', '.join(BUILDERS) or 'none'}); call register_builder first "
                         "(torch_pruning_ext.experiments registers its CIFAR models) or pass builder=")
    else:
        raise ValueError(f"{path} holds a {saved['class']}; pass builder=<function returning the unpruned model>")
    state = saved["state_dict"]
    for name, module in model.named_modules():
        _resize(module, state, f"{name}." if name else "")
    model.load_state_dict(state)
    modules = dict(model.named_modules())
    for name, values in saved.get("integer_attributes", {}).items():  # widths forward() may read
        if name in modules:
            modules[name].__dict__.update({key: int(value) for key, value in values.items()
                                           if isinstance(modules[name].__dict__.get(key), int)})
    return model.eval()
