import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch_pruning_ext.models import build_model  # noqa: E402


def randomize_batchnorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and affine parameters, as a trained model has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture
def make_model():
    def make(name: str, num_classes: int = 10, seed: int = 0):
        torch.manual_seed(seed)
        return randomize_batchnorms(build_model(name, num_classes), seed)
    return make


@pytest.fixture
def example():
    return torch.randn(1, 3, 32, 32)
