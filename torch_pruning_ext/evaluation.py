"""Top-1 accuracy (per sample, not averaged per batch) and the fast inference layout it runs in."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

# Measured on 2 CPU cores: batches of 100 in channels_last run VGG11-BN 1.2x and ResNet18 1.6x
# faster than batches of 500 in the default layout (scripts/bench.py).
EVAL_BATCH_SIZE = 100


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


@torch.inference_mode()
def predictions(model: nn.Module, inputs: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE,
                device="cpu") -> torch.Tensor:
    """Predicted class of every input, computed in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    with fast_layout(model):
        for start in range(0, inputs.shape[0], batch_size):
            out.append(model(as_fast_input(inputs[start:start + batch_size], device)).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE,
             device="cpu") -> float:
    """Fraction of correctly classified samples (sample-weighted, so a short last batch counts right)."""
    if inputs.shape[0] == 0:
        raise ValueError("cannot compute accuracy on an empty data set")
    return (predictions(model, inputs, batch_size, device) == labels.cpu()).float().mean().item()
