"""Calibration synthesised from a model's BatchNorm statistics."""
import copy

import pytest
import torch
import torch.nn as nn

from torch_pruning_ext import compress, synthesize_calibration


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),  # one after the ReLU
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    # running statistics of a "training set" unlike noise: smooth images with per-channel offsets
    for bn in (model[1], model[5]):
        bn.momentum = None  # cumulative averages
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            coarse = torch.randn(32, 3, 2, 2, generator=generator)
            images = nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear") * 2.0
            model.train()(images + torch.tensor([1.5, -1.0, 0.5]).view(1, 3, 1, 1))
    return model.eval()


def mismatch(model, x) -> float:
    """Mean over BatchNorms of the squared error of batch means and variances, as in synthesis."""
    captured = {}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [bn.register_forward_pre_hook(lambda m, a: captured.__setitem__(m, a[0])) for bn in bns]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return sum(float(((captured[bn].mean((0, 2, 3)) - bn.running_mean) ** 2).sum()
                     + ((captured[bn].var((0, 2, 3), unbiased=False) - bn.running_var) ** 2).sum())
               for bn in bns) / len(bns)


def test_synthetic_batch_statistics_approach_the_running_statistics():
    model, example = bn_net(), torch.randn(1, 3, 8, 8)
    state = copy.deepcopy(model.state_dict())
    inputs, report = synthesize_calibration(model, example, n=48, iterations=60, batch_size=24)
    assert inputs.shape == (48, 3, 8, 8) and report.samples == 48 and report.batchnorms == 2
    noise = mismatch(model, torch.randn(48, 3, 8, 8))
    assert mismatch(model, inputs) < 0.1 * noise  # fails if synthesis does nothing
    assert report.loss_end < 0.1 * report.loss_start
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert all(p.grad is None for p in model.parameters())


def test_the_same_seed_gives_the_same_inputs():
    model, example = bn_net(), torch.randn(1, 3, 8, 8)
    first, _ = synthesize_calibration(model, example, n=8, iterations=5, seed=3)
    again, _ = synthesize_calibration(model, example, n=8, iterations=5, seed=3)
    other, _ = synthesize_calibration(model, example, n=8, iterations=5, seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_time_bound_and_models_without_batchnorm():
    model, example = bn_net(), torch.randn(1, 3, 8, 8)
    inputs, report = synthesize_calibration(model, example, n=64, iterations=50, batch_size=16, max_seconds=0.0)
    assert report.stopped_early and len(inputs) == report.samples == 16
    with pytest.raises(ValueError, match="has no BatchNorm with running statistics"):
        synthesize_calibration(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 4))
    with pytest.raises(ValueError, match="one floating-point tensor"):
        synthesize_calibration(model, torch.zeros(1, 3, 8, 8, dtype=torch.long))


def test_compress_with_synthetic_calibration_reconstructs_without_data():
    model, example = bn_net(), torch.randn(1, 3, 8, 8)
    small, summary = compress(model, example, 0.5, method="fold", calibration="synthetic", calibration_samples=32)
    assert summary.repair == "reconstruct" and summary.synthesis["samples"] == 32
    assert summary.channels["3"] == [8, 4] and small(example).shape == (1, 4)
    with pytest.raises(ValueError, match="unknown calibration 'synthetc'"):
        compress(model, example, calibration="synthetc")


@pytest.mark.parametrize("options", [{"objective": "moments"}, {"objective": "kl", "bfloat16": True}])
def test_each_objective_and_bfloat16_match_the_statistics(options):
    model, example = bn_net(), torch.randn(1, 3, 8, 8)
    inputs, report = synthesize_calibration(model, example, n=48, iterations=60, batch_size=24, lr=0.1, **options)
    assert inputs.dtype == torch.float32 and inputs.is_contiguous()
    assert mismatch(model, inputs) < 0.2 * mismatch(model, torch.randn(48, 3, 8, 8))


def test_unknown_objective_is_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown synthesis objective 'l2'; choose one of: moments, kl"):
        synthesize_calibration(bn_net(), torch.randn(1, 3, 8, 8), objective="l2")
