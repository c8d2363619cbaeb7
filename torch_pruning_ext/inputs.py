"""What a model takes and what it gives back: one way to run it on a batch, and a description of
its outputs that a pruned copy must match.

A batch is a tensor (one positional input), a tuple or list (positional inputs) or a dict (keyword
inputs, e.g. {"input_ids": ..., "attention_mask": ...}); its tensors share the sample dimension 0,
anything else in it (None, flags) is passed along unchanged. An output is a tensor, or any nesting of
tuples, lists and dicts of tensors (a Hugging Face ModelOutput is a dict).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .modes import eval_mode


def run_model(model: nn.Module, inputs):
    """model(inputs), model(*inputs) or model(**inputs), by the batch's form."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def run_hooked(model: nn.Module, inputs, handles: list):
    """Run `model` on `inputs` in eval mode and remove the hook `handles` afterwards, also on error."""
    try:
        with eval_mode(model):
            return run_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


def map_tensors(inputs, function):
    """The batch with `function` applied to each of its tensors (same structure)."""
    if isinstance(inputs, torch.Tensor):
        return function(inputs)
    if isinstance(inputs, dict):
        return {key: map_tensors(value, function) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(map_tensors(item, function) for item in inputs)
    return inputs


def batch_length(inputs) -> int:
    """Samples in a batch: the length of its first tensor's dimension 0."""
    tensors = [t for t in tensors_of(inputs) if t.dim() > 0]
    if not tensors:
        raise ValueError(f"a batch needs at least one tensor with a sample dimension, got {shape_text(inputs)}")
    return len(tensors[0])


def take(inputs, index):
    """The samples `index` (a slice or an index tensor) of every tensor in a batch."""
    def part(tensor):
        if tensor.dim() == 0:
            return tensor
        return tensor[index.to(tensor.device) if isinstance(index, torch.Tensor) else index]
    return map_tensors(inputs, part)


def concatenate(batches: list):
    """One batch from batches of the same structure, their tensors joined along dimension 0."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {key: concatenate([batch[key] for batch in batches]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concatenate(list(items)) for items in zip(*batches))
    return first


def shape_text(inputs) -> str:
    """'2x3x32x32', '(2x8, 2x8)' or '{ids: 2x8}': the shapes of a batch or an output, for messages."""
    if isinstance(inputs, torch.Tensor):
        return "x".join(map(str, inputs.shape)) or "scalar"
    if isinstance(inputs, (list, tuple)):
        return "(" + ", ".join(shape_text(item) for item in inputs) + ")"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{key}: {shape_text(value)}" for key, value in inputs.items()) + "}"
    return type(inputs).__name__


def signature(outputs):
    """The structure and shapes of a model's outputs (tensors become shapes), comparable with ==."""
    if isinstance(outputs, torch.Tensor):
        return tuple(outputs.shape)
    if isinstance(outputs, (list, tuple)):
        return type(outputs).__name__, tuple(signature(item) for item in outputs)
    if isinstance(outputs, dict):
        return "dict", tuple((key, signature(value)) for key, value in outputs.items())
    return type(outputs).__name__


def tensors_of(outputs) -> list[torch.Tensor]:
    """Every tensor in a nested output."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)):
        return [t for item in outputs for t in tensors_of(item)]
    if isinstance(outputs, dict):
        return [t for item in outputs.values() for t in tensors_of(item)]
    return []


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
