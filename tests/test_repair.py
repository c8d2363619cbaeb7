import copy

import pytest
import torch

from tests.helpers import FirstOfPairs, make_twins
from torch_pruning_ext import IntraFusionPruner, OptimalTransport, fold_batchnorms, load_pruned, save_pruned
from torch_pruning_ext.repair import layer_statistics, repair_with_data, repair_without_data


def _folded(make_model, name="vgg11_bn"):
    model = make_model(name)
    folded = copy.deepcopy(model)
    pairs = fold_batchnorms(folded, torch.randn(1, 3, 32, 32), "exact")
    return model, folded, {p.layer: p.batchnorm for p in pairs}


@pytest.mark.slow
def test_repair_of_an_unpruned_model_changes_nothing(make_model):
    _, folded, _ = _folded(make_model)
    repaired = copy.deepcopy(folded)
    layers = [n for n, m in repaired.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    inputs = torch.randn(64, 3, 32, 32)
    repair_with_data(folded, repaired, layers, {}, inputs, batch_size=32)
    x = torch.randn(8, 3, 32, 32)
    assert torch.allclose(repaired(x), folded(x), atol=1e-5, rtol=1e-5)


def _pruned(folded, groups=(1, 6), sparsity=0.7):
    model = copy.deepcopy(folded)
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 32, 32), fold_bn=None)
    results = pruner.prune(list(groups), sparsity, OptimalTransport())
    return model, pruner, results


@pytest.mark.slow
def test_data_repair_restores_statistics_and_is_deterministic(make_model, tmp_path):
    _, folded, _ = _folded(make_model)
    inputs = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    every_layer = [n for n, m in folded.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    repaired = []
    for precomputed in (None, layer_statistics(folded, every_layer, inputs, batch_size=48)):
        model, pruner, results = _pruned(folded)
        layers = sorted({n for r in results for n in r.producers + r.consumers})
        repair_with_data(folded, model, layers, pruner.channel_origin, inputs, batch_size=48,
                         reference_stats=precomputed)
        repaired.append(model)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(repaired[0](x), repaired[1](x))  # deterministic, and the same with statistics measured once
    model, channel_origin = repaired[0], _pruned(folded)[1].channel_origin
    assert "features.4" in layers and "features.4" in channel_origin  # a producer of group 6
    after = layer_statistics(model, layers, inputs)  # every layer, measured after all corrections
    before = layer_statistics(folded, layers, inputs)
    for name in layers:
        origin = channel_origin.get(name, slice(None))
        assert torch.allclose(after[name][0], before[name][0][origin], atol=1e-4), name
        assert torch.allclose(after[name][1], before[name][1][origin], rtol=1e-3, atol=1e-5), name
    save_pruned(model, tmp_path / "repaired.pt", "vgg11_bn", 10)
    assert torch.equal(load_pruned(tmp_path / "repaired.pt")(x), model(x))


@pytest.mark.parametrize("rule", ["function_preserving", "reference"])
def test_datafree_repair_undoes_twin_scaling(make_model, rule):
    original = make_model("vgg11_bn")
    x = torch.randn(4, 3, 32, 32)
    folded = copy.deepcopy(original)
    pruner = IntraFusionPruner(folded, x[:1], importance=FirstOfPairs(), fold_bn="exact")
    make_twins(folded, pruner, 2)
    # the unfolded original must describe the same twins: give the twin BN the same statistics
    half = 256
    for bn_name in ("features.19",):
        bn = dict(original.named_modules())[bn_name]
        for tensor in (bn.running_mean, bn.running_var, bn.weight.data, bn.bias.data):
            tensor[half:] = tensor[:half]
    reference_model = copy.deepcopy(folded)
    before = folded(x)
    results = pruner.prune([2], 0.5, OptimalTransport(), fusion_rule=rule)
    repair_without_data(original, reference_model, folded, results, pruner.channel_origin,
                        {"features.18": "features.19"})
    assert (folded(x) - before).abs().max() < 1e-4


class _HeadCalledByKeyword(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)
        self.aux = torch.nn.Linear(4, 2)  # a training-only head: never runs in eval mode

    def forward(self, x):
        return self.fc(input=self.conv(x).mean((2, 3)))


def test_data_repair_handles_keyword_calls_and_layers_that_never_run():
    torch.manual_seed(0)
    original = _HeadCalledByKeyword().eval()
    damaged = copy.deepcopy(original)
    with torch.no_grad():
        damaged.conv.weight.mul_(3.0)
        damaged.conv.bias.add_(1.0)
    aux_before = damaged.aux.weight.clone()
    inputs = torch.randn(32, 3, 8, 8)
    repair_with_data(original, damaged, ["conv", "fc", "aux"], {}, inputs)
    assert torch.allclose(damaged(inputs), original(inputs), atol=1e-4)  # an affine shift is fully undone
    assert torch.equal(damaged.aux.weight, aux_before)
    assert set(layer_statistics(damaged, ["conv", "aux"], inputs)) == {"conv"}


@pytest.mark.slow
def test_downstream_repair_restores_later_layers_and_leaves_earlier_ones(make_model):
    _, folded, _ = _folded(make_model)
    inputs = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    convs = [n for n, m in folded.named_modules() if isinstance(m, torch.nn.Conv2d)]
    last = convs[-1]
    reference = layer_statistics(folded, [last], inputs)[last]
    gaps = {}
    for downstream in ([], convs):
        model, pruner, results = _pruned(folded, groups=(6,))
        layers = sorted({n for r in results for n in r.producers + r.consumers})
        assert last not in layers and convs[0] not in layers  # group 6 sits between them
        repair_with_data(folded, model, layers, pruner.channel_origin, inputs, downstream=downstream)
        assert torch.equal(dict(model.named_modules())[convs[0]].weight, dict(folded.named_modules())[convs[0]].weight)
        gaps[len(downstream) > 0] = (layer_statistics(model, [last], inputs)[last][1] - reference[1]).abs().max()
    assert gaps[True] < 1e-3 * reference[1].max() < gaps[False]  # only the downstream repair reaches the last conv
