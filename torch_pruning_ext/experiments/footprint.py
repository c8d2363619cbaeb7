"""Memory footprint of a model: parameter storage (dense fp32 and sparse CSR) and activations.

Structured pruning shrinks both the parameters and the activations; unstructured pruning only the
parameters, and only if they are stored in a sparse format.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..inputs import run_hooked

FP32_BYTES = 4
INDEX_BYTES = 4  # int32 column indices and row pointers


@dataclass
class Footprint:
    params: int
    nonzero_params: int
    dense_bytes: int
    sparse_bytes: int
    peak_activation_bytes: int


def dense_bytes(model: nn.Module) -> int:
    """Every parameter stored as fp32."""
    return FP32_BYTES * sum(p.numel() for p in model.parameters())


def csr_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor in CSR form (rows = first dimension, fp32 values, int32 indices);
    1-D tensors (biases, norms) are counted dense."""
    if tensor.dim() < 2:
        return FP32_BYTES * tensor.numel()
    rows = tensor.shape[0]
    nonzero = int(torch.count_nonzero(tensor))
    return nonzero * (FP32_BYTES + INDEX_BYTES) + (rows + 1) * INDEX_BYTES


def sparse_bytes(model: nn.Module) -> int:
    """Parameter storage with every weight matrix/kernel in CSR (see csr_bytes)."""
    return sum(csr_bytes(p.detach()) for p in model.parameters())


@torch.inference_mode()
def peak_activation_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Largest (inputs + output) of any leaf module in one forward pass, fp32, for `example`
    (batch 1 in the reports). For a chain of layers this is the peak of live activations; in
    branched networks a held skip tensor can add to it, so read it as a lower bound there."""
    peak = 0

    def hook(_, inputs, output):
        nonlocal peak
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)] + [output]
        peak = max(peak, FP32_BYTES * sum(t.numel() for t in tensors))

    run_hooked(model, example, [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())])
    return peak


def footprint(model: nn.Module, example: torch.Tensor) -> Footprint:
    return Footprint(params=sum(p.numel() for p in model.parameters()),
                     nonzero_params=sum(int(torch.count_nonzero(p)) for p in model.parameters()),
                     dense_bytes=dense_bytes(model), sparse_bytes=sparse_bytes(model),
                     peak_activation_bytes=peak_activation_bytes(model, example))
