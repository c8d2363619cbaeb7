"""ONNX export of a (pruned) model, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .files import atomic_path


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | Path, check: bool = True,
                tolerance: float = 1e-4) -> float | None:
    """Export to ONNX (dynamic batch size); with `check`, run onnxruntime on `example_inputs` and
    raise if its outputs differ from PyTorch's by more than `tolerance`. Returns that difference."""
    model = model.eval()
    with atomic_path(path) as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter needs no onnxscript
        torch.onnx.export(model, (example_inputs,), str(temporary), dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    if not check:
        return None
    difference = float(np.abs(onnx_outputs(path, example_inputs) - _torch_outputs(model, example_inputs)).max())
    if difference > tolerance:
        raise RuntimeError(f"onnxruntime output of {path} differs from PyTorch by {difference:.3g} > {tolerance}")
    return difference


@torch.inference_mode()
def _torch_outputs(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    return model(inputs).numpy()


def onnx_session(path: str | Path):
    import onnxruntime
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_outputs(path: str | Path, inputs: torch.Tensor) -> np.ndarray:
    return onnx_session(path).run(None, {"input": inputs.numpy()})[0]
