"""The scalable reconstruction: patch rows, the cost and memory bounds, the pass in chunks."""
import copy
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_pruning_ext import IntraFusionPruner, compress, fold_batchnorms, repair_by_reconstruction
from torch_pruning_ext.patches import output_rows, patch_rows, rows_to_weight, samples_of, weight_rows

LAYERS = [
    nn.Conv2d(5, 7, 3, padding=1),
    nn.Conv2d(5, 7, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    nn.Conv2d(5, 7, 4, padding="same"),
    nn.Conv2d(5, 7, 3, padding=2, padding_mode="reflect"),
    nn.Conv2d(5, 7, 3, padding=1, padding_mode="circular"),
    nn.Conv2d(5, 7, (9, 1), stride=(4, 1), padding=(4, 0)),
    nn.Conv1d(5, 7, 5, stride=2, padding=2),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: repr(layer))
def test_patch_rows_times_weight_rows_is_the_layer(layer):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 11) if isinstance(layer, nn.Conv1d) else torch.randn(3, 5, 11, 12)
    expected = layer(x) - layer.bias.view(1, -1, *([1] * (x.dim() - 2)))
    expected = expected.movedim(1, -1).reshape(-1, 7)
    with torch.no_grad():
        rows = patch_rows(layer, x)
        assert torch.allclose(rows @ weight_rows(layer, layer.weight).t(), expected, atol=1e-5)
        assert torch.allclose(output_rows(layer, x, layer.weight), expected, atol=1e-5)
        assert torch.equal(rows_to_weight(layer, weight_rows(layer, layer.weight)), layer.weight)
        # a channels-last input gives the same rows
        if x.dim() == 4:
            assert torch.equal(patch_rows(layer, x.contiguous(memory_format=torch.channels_last)), rows)
        # picked rows are gathered alone, the same as those rows of the whole
        picked = torch.randperm(len(rows))[:9]
        assert torch.equal(patch_rows(layer, x, picked), rows[picked])
        assert torch.allclose(output_rows(layer, x, layer.weight, picked), expected[picked], atol=1e-5)


def test_linear_rows_are_tokens():
    layer, x = nn.Linear(6, 4), torch.randn(2, 5, 6)
    with torch.no_grad():
        assert samples_of(layer, x).shape == (2, 5, 6)
        assert torch.allclose(patch_rows(layer, x) @ weight_rows(layer, layer.weight).t() + layer.bias,
                              layer(x).reshape(-1, 4), atol=1e-6)
        assert torch.equal(patch_rows(layer, x, torch.tensor([7, 2])), x.reshape(-1, 6)[[7, 2]])


class Audio(nn.Module):
    """A small CREPE-like stack: a long first kernel, then (16, 1) kernels; BN after the ReLU."""

    def __init__(self, widths=(32, 16, 16)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], (64, 1), stride=(4, 1), padding=(30, 0))
        self.conv2 = nn.Conv2d(widths[0], widths[1], (16, 1), padding=(8, 0))
        self.conv3 = nn.Conv2d(widths[1], widths[2], (16, 1), padding=(8, 0))
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for w in widths)
        self.head = nn.Linear(widths[2] * 8, 10)

    def forward(self, x):
        x = x.view(-1, 1, 256, 1)
        for conv, bn in zip((self.conv1, self.conv2, self.conv3), self.bns):
            x = F.max_pool2d(bn(F.relu(conv(x))), (2, 1))
        return self.head(x.flatten(1))


def _pruned_pair(model, x, sparsity=0.5):
    model.eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(0, 1)
            bn.running_var.uniform_(0.5, 2)
    fold_batchnorms(model, x[:1], "reference")
    pruned = copy.deepcopy(model)
    pruner = IntraFusionPruner(pruned, x[:1], fold_bn=None)
    pruner.prune("all", sparsity)
    return model, pruned, pruner.channel_origin


def _error(original, pruned, x):
    with torch.no_grad():
        return float((pruned(x) - original(x)).pow(2).mean() / original(x).pow(2).mean())


def test_chunks_keep_an_unpruned_model_and_the_head_reads_every_sample():
    torch.manual_seed(0)
    model = Audio().eval()
    fold_batchnorms(model, torch.randn(1, 256), "reference")
    copied, x = copy.deepcopy(model), torch.randn(96, 256)
    report = repair_by_reconstruction(model, copied, {}, x, batch_size=20, cost=float("inf"))
    assert all(entry["mode"] == "output" and entry["explained"] > 0.999 for entry in report.values())
    # the head (one position per sample) wants more samples than one chunk: it read all 96, from 5 chunks
    assert report["head"]["samples"] == 96
    assert torch.allclose(copied(x), model(x), atol=1e-4, rtol=1e-4)


def test_chunks_reconstruct_about_as_well_as_one_chunk():
    torch.manual_seed(1)
    x = torch.randn(160, 256)
    original, pruned, origin = _pruned_pair(Audio(), x)
    held_out = torch.randn(64, 256)
    before = _error(original, pruned, held_out)
    errors = {}
    for batch_size in (160, 40):
        refit = copy.deepcopy(pruned)
        repair_by_reconstruction(original, refit, origin, x, batch_size=batch_size, cost=float("inf"))
        errors[batch_size] = _error(original, refit, held_out)
    assert errors[160] < 0.5 * before
    assert errors[40] < 1.25 * errors[160]


def test_every_sample_runs_through_each_model_once_and_nothing_is_left_behind():
    torch.manual_seed(5)
    x = torch.randn(96, 256)
    original, pruned, origin = _pruned_pair(Audio(), x)
    seen = {"original": 0, "pruned": 0}

    def counter(key):
        def count(_, args):
            seen[key] += len(args[0])
        return count
    counters = [model.conv1.register_forward_pre_hook(counter(key))
                for key, model in (("original", original), ("pruned", pruned))]
    threads = threading.active_count()
    report = repair_by_reconstruction(original, pruned, origin, x, batch_size=20, cost=float("inf"))
    for handle in counters:
        handle.remove()
    # every layer read all five chunks, yet each model ran each sample once, not once per layer
    assert all(entry["samples"] == 96 for entry in report.values())
    assert seen == {"original": 96 + 1, "pruned": 96}  # + the one sample that maps the original's layers
    assert threading.active_count() == threads
    assert not any(module._forward_pre_hooks for model in (original, pruned) for module in model.modules())


def test_an_error_inside_the_pruned_model_reaches_the_caller_as_itself():
    torch.manual_seed(6)
    x = torch.randn(64, 256)
    original, pruned, origin = _pruned_pair(Audio(), x)

    def broken(*_):
        raise KeyError("broken layer")
    pruned.conv3.register_forward_pre_hook(broken)
    threads = threading.active_count()
    with pytest.raises(KeyError, match="broken layer"):
        repair_by_reconstruction(original, pruned, origin, x, batch_size=16)
    assert threading.active_count() == threads


def test_too_many_chunks_are_refused_before_any_work():
    model = Audio().eval()
    with pytest.raises(ValueError, match=r"batch_size 1 cuts 300 calibration samples into more than 256 chunks.*"
                                         r"use batch_size >= 2"):
        repair_by_reconstruction(model, copy.deepcopy(model), {}, torch.randn(300, 256), batch_size=1)
    with pytest.raises(ValueError, match="batch_size 1 cuts 300"):
        compress(model, torch.randn(2, 256), calibration=torch.randn(300, 256), batch_size=1)


def test_a_layer_over_the_cost_or_memory_allowance_gets_the_input_space_map():
    torch.manual_seed(2)
    x = torch.randn(64, 256)
    original, pruned, origin = _pruned_pair(Audio(widths=(256, 16, 16)), x)
    report = repair_by_reconstruction(original, copy.deepcopy(pruned), origin, x, memory_budget=2 ** 20)
    # conv2 reads 128 channels x 16 taps = 2049 features: 3 x 2049^2 float64 is over 1 MiB, and
    # solving it (2049^3 / 3 multiply-adds) is over the allowance any small cost leaves
    assert report["conv2"]["mode"] == "input" and "memory_budget" in report["conv2"]["why"]
    assert report["conv1"]["mode"] == "output"
    cheap = repair_by_reconstruction(original, copy.deepcopy(pruned), origin, x, cost=1e-9)
    assert cheap["conv2"]["mode"] == "input" and "cost" in cheap["conv2"]["why"]
    full = repair_by_reconstruction(original, copy.deepcopy(pruned), origin, x, cost=float("inf"))
    assert all(entry["mode"] == "output" for entry in full.values())


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ({"memory_budget": -1}, "memory_budget must be a positive number"),
    ({"cost": 0}, "cost must be a positive number"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    model = Audio().eval()
    with pytest.raises(ValueError, match=message):
        repair_by_reconstruction(model, copy.deepcopy(model), {}, torch.randn(4, 256), **options)


@pytest.mark.parametrize("options, message", [({"batch_size": -3}, "batch_size"),
                                              ({"memory_budget": 0}, "memory_budget"),
                                              ({"reconstruct_cost": -1.0}, "cost")])
def test_compress_refuses_bad_reconstruction_options_before_any_work(options, message):
    model = Audio().eval()
    calls = []
    with pytest.raises(ValueError, match=message):
        compress(model, torch.randn(2, 256), calibration=torch.randn(8, 256), progress=lambda *a: calls.append(a),
                 **options)
    assert not calls


def test_compress_passes_the_batch_size_to_the_reconstruction():
    torch.manual_seed(3)
    model = Audio().eval()
    calibration = torch.randn(48, 256)
    _, summary = compress(model, torch.randn(2, 256), 0.5, "default", calibration, batch_size=16)
    assert summary.repaired_layers["head"]["samples"] == 48


@pytest.mark.parametrize("layer", [nn.Conv2d(6, 5, (9, 1), padding=(4, 0)), nn.Conv2d(6, 5, (1, 10), padding="same"),
                                   nn.Conv1d(6, 5, 12, padding=3, padding_mode="reflect")], ids=repr)
def test_lag_gram_and_cross_equal_the_patch_products(layer):
    from torch_pruning_ext.patches import lag_kernel, padded_input, patch_cross, patch_gram
    torch.manual_seed(4)
    x = torch.randn(3, 6, 20) if isinstance(layer, nn.Conv1d) else torch.randn(3, 6, 20, 2) if \
        layer.kernel_size[1] == 1 else torch.randn(3, 6, 2, 20)
    assert lag_kernel(layer) >= 8
    offset = torch.randn(6)
    with torch.no_grad():
        rows = patch_rows(layer, x).double() - offset.double().repeat(lag_kernel(layer))
        shifted = padded_input(layer, x) - offset.view(1, -1, 1, 1)
        gram, sums, positions = patch_gram(layer, shifted)
        assert positions == len(rows)
        assert torch.allclose(gram, rows.t() @ rows, atol=1e-4, rtol=1e-5)  # float32 products
        assert torch.allclose(sums, rows.sum(0), atol=1e-4)
        outputs = layer(x).detach()
        outputs = outputs.unsqueeze(2) if isinstance(layer, nn.Conv1d) else outputs
        flat = outputs.permute(0, 2, 3, 1).reshape(-1, 5).double()
        assert torch.allclose(patch_cross(layer, shifted, outputs).double(), rows.t() @ flat,
                              atol=1e-3, rtol=1e-4)


def test_a_long_one_dimensional_kernel_fits_in_output_space_as_with_patches(monkeypatch):
    """The lag path gives the fit the patch path gives (same samples, every position)."""
    import torch_pruning_ext.reconstruction as reconstruction
    torch.manual_seed(5)
    x = torch.randn(48, 256)
    original, pruned, origin = _pruned_pair(Audio(), x)
    fits = {}
    for taps in (True, False):
        if not taps:
            monkeypatch.setattr(reconstruction, "lag_kernel", lambda layer: 0)
        refit = copy.deepcopy(pruned)
        report = repair_by_reconstruction(original, refit, origin, x, cost=float("inf"))
        assert report["conv2"]["mode"] == "output"
        fits[taps] = refit.conv2.weight.detach().clone(), refit.conv2.bias.detach().clone()
    assert torch.allclose(fits[True][0], fits[False][0], atol=1e-4, rtol=1e-3)
    assert torch.allclose(fits[True][1], fits[False][1], atol=1e-4, rtol=1e-3)
