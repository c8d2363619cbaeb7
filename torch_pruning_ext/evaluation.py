"""Top-1 accuracy (per sample, not averaged per batch) and the size of a model."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.inference_mode()
def predictions(model: nn.Module, inputs: torch.Tensor, batch_size: int = 500, device="cpu") -> torch.Tensor:
    """Predicted class of every input, computed in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start:start + batch_size].to(device)
        out.append(model(batch).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             device="cpu") -> float:
    """Fraction of correctly classified samples (sample-weighted, so a short last batch counts right)."""
    if inputs.shape[0] == 0:
        raise ValueError("cannot compute accuracy on an empty data set")
    return (predictions(model, inputs, batch_size, device) == labels.cpu()).float().mean().item()
