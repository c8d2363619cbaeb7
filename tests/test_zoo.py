"""Models nobody here wrote: torchvision builders with random weights and randomised BatchNorm."""
import warnings

import torch
import torch.nn as nn
import torchvision

from tests.helpers import randomize_batchnorms
from torch_pruning_ext import IntraFusionPruner, OptimalTransport


def test_torchvision_resnet50_end_to_end():
    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.resnet50(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    pruner = IntraFusionPruner(model, x[:1])
    indices = [0, 1, pruner.num_groups - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group falls back (the rule that warns on several groups is not used)
        results = pruner.prune(indices, 0.5, OptimalTransport(), fusion_rule="function_preserving")
    assert all(r.fused for r in results)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_torchvision_mobilenet_v2_fuses_depthwise_groups():
    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.mobilenet_v2(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    pruner = IntraFusionPruner(model, x[:1])
    depthwise = [i for i, info in enumerate(pruner.groups())
                 if any(isinstance(dict(model.named_modules())[name], nn.Conv2d)
                        and dict(model.named_modules())[name].groups > 1 for name, _ in info.members)]
    assert depthwise
    results = pruner.prune(depthwise[:3] + [0], 0.5, OptimalTransport(), fusion_rule="function_preserving")
    assert all(r.fused for r in results)
    assert model(x).shape == (2, 10) and torch.isfinite(model(x)).all()
