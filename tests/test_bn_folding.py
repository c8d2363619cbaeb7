import copy

import pytest
import torch
import torch.nn as nn

from tests.helpers import randomize_batchnorms
from torch_pruning_ext import fold_batchnorms


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_exact_fold_preserves_outputs(make_model, name):
    model = make_model(name)
    x = torch.randn(8, 3, 32, 32)
    before = model(x)
    folded = fold_batchnorms(model, torch.randn(1, 3, 32, 32), mode="exact")
    assert len(folded) == (8 if name == "vgg11_bn" else 20)
    assert torch.allclose(model(x), before, atol=1e-5, rtol=0)


def test_reference_fold_omits_eps(make_model):
    model = make_model("vgg11_bn")
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    exact = copy.deepcopy(model)
    fold_batchnorms(model, x[:1], mode="reference")
    fold_batchnorms(exact, x[:1], mode="exact")
    bn = model.features[1]
    assert torch.all(bn.running_var == 1) and torch.all(bn.running_mean == 0)
    assert torch.all(exact.features[1].running_var == 1 - bn.eps)
    difference = (model(x) - before).abs().max().item()
    assert 0 < difference < 1e-3  # the released fold is close but not exact
    assert not torch.equal(model.features[0].weight, exact.features[0].weight)


class LinearBN(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.fc = nn.Linear(6, 5, bias=bias)
        self.bn = nn.BatchNorm1d(5)
        self.conv = nn.Conv1d(5, 4, 3, bias=bias)
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, x):
        y = torch.relu(self.bn(self.fc(x)))
        return self.bn2(self.conv(y.unsqueeze(-1).expand(-1, -1, 7))).sum(-1)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_conv1d_with_batchnorm1d(bias):
    torch.manual_seed(0)
    model = randomize_batchnorms(LinearBN(bias))
    x = torch.randn(3, 6)
    before = model(x)
    folded = fold_batchnorms(model, x, mode="exact")
    assert {p.batchnorm for p in folded} == {"bn", "bn2"}
    assert model.fc.bias is not None and model.conv.bias is not None
    assert torch.allclose(model(x), before, atol=1e-5, rtol=0)


class PreActivation(nn.Module):
    """A BN after an addition and a BN whose conv also feeds elsewhere must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_after_add = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn_after_add(self.conv(x) + 1)
        z = self.conv2(y)
        return self.bn_shared(z) + z


def test_only_single_consumer_batchnorms_are_folded():
    torch.manual_seed(0)
    model = randomize_batchnorms(PreActivation())
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    assert fold_batchnorms(model, x, mode="exact") == []
    assert torch.equal(model(x), before)


def test_unknown_fold_mode_is_rejected(make_model):
    with pytest.raises(ValueError, match="'approx'.*exact, reference"):
        fold_batchnorms(make_model("vgg11_bn"), torch.randn(1, 3, 32, 32), mode="approx")
