"""Run a model in eval mode, or in the fast CPU layout, for a while and give it back as it was."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside the block (BatchNorm uses its running statistics and does not update them)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _layout_restorers(model: nn.Module) -> list:
    """A function per contiguous 4-D parameter, gradient and buffer that makes it contiguous again."""
    restore = []
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is not None and parameter.dim() == 4 and parameter.is_contiguous():
                restore.append(lambda p=parameter: setattr(p, "data", p.data.contiguous()))
            if parameter is not None and parameter.grad is not None and parameter.grad.dim() == 4 \
                    and parameter.grad.is_contiguous():
                restore.append(lambda p=parameter: setattr(p, "grad", p.grad.contiguous()))
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.dim() == 4 and buffer.is_contiguous():
                restore.append(lambda m=module, n=name: m._buffers.__setitem__(n, m._buffers[n].contiguous()))
    return restore


@contextmanager
def fast_layout(model: nn.Module):
    """Run a conv net with channels_last weights (oneDNN's fastest CPU layout); values are unchanged
    and every tensor gets its own layout back afterwards, so weight views keep working. The layout
    changes run outside inference mode, so the model can still be trained after an evaluation."""
    with torch.inference_mode(False):
        restorers = _layout_restorers(model)
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        with torch.inference_mode(False):
            for restore in restorers:
                restore()


def as_fast_input(batch: torch.Tensor, device) -> torch.Tensor:
    """A batch on `device`, channels_last when it is an image batch."""
    if batch.dim() == 4:
        return batch.to(device, memory_format=torch.channels_last)
    return batch.to(device)
