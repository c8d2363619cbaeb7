"""Reuse the activations of the unchanged prefix of a network across pruned copies.

Pruning one group changes only the layers from the group's first member on; everything before
computes the same values in every copy. A model that lists its forward pass as ``stages()``
(name, callable) can therefore be evaluated from a cached intermediate activation.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..modes import as_fast_input, eval_mode, fast_layout
from .evaluation import EVAL_BATCH_SIZE


def has_stages(model: nn.Module) -> bool:
    return callable(getattr(model, "stages", None))


def first_stage(model: nn.Module, layer_names) -> int:
    """Index of the first stage that contains any of `layer_names` (0 if none is found)."""
    names = [name for name, _ in model.stages()]
    hits = [i for i, stage in enumerate(names) for layer in layer_names
            if layer == stage or layer.startswith(stage + ".")]
    return min(hits) if hits else 0


@torch.inference_mode()
def run_stages(model: nn.Module, inputs: torch.Tensor, start: int = 0, stop: int | None = None,
               batch_size: int = EVAL_BATCH_SIZE, device="cpu") -> torch.Tensor:
    """Apply stages[start:stop] to `inputs` in batches (eval mode); returns the result on the CPU."""
    pieces = [fn for _, fn in model.stages()][start:stop]
    outputs = []
    with eval_mode(model), fast_layout(model):
        for begin in range(0, inputs.shape[0], batch_size):
            out = as_fast_input(inputs[begin:begin + batch_size], device)
            for piece in pieces:
                out = piece(out)
            outputs.append(out.cpu())
    return torch.cat(outputs)


class PrefixCache:
    """Keeps the activation after the first `start` stages of a reference model (one at a time,
    since cells come grouped by layer and a cache of early layers can take gigabytes)."""

    def __init__(self, reference: nn.Module, inputs: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE,
                 device="cpu"):
        # the reference runs where the batches go (a copy, so the caller's model stays where it is)
        on_cpu = torch.device(device).type == "cpu"
        self.reference = reference if on_cpu else copy.deepcopy(reference).to(device)
        self.inputs, self.batch_size, self.device = inputs, batch_size, device
        self._start, self._activations = 0, inputs

    def activations(self, start: int) -> torch.Tensor:
        """The activation before stage `start`; moving forward continues from the cached one (which
        is then held until the new one is built: peak memory is both), moving back starts over from the
        inputs (so callers visit starts in increasing order)."""
        if start != self._start:
            origin, previous = (self._start, self._activations) if start > self._start else (0, self.inputs)
            self._activations = None  # moving back frees the old cache before computing the new one
            self._activations = run_stages(self.reference, previous, origin, start, self.batch_size, self.device) \
                if start > 0 else self.inputs
            self._start = start
        return self._activations
