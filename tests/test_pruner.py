import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from tests.helpers import FirstOfPairs, make_twins, randomize_batchnorms
from torch_pruning_ext import IntraFusionPruner, OptimalTransport, identity_map, list_groups
from torch_pruning_ext.fusion import fuse_members, group_members, prune_channels
from torch_pruning_ext.groups import full_group

VGG_ROOTS = ["features.25", "features.22", "features.18", "features.15", "features.11", "features.8",
             "features.4", "features.0"]


def test_vgg_group_numbering(make_model):
    groups = list_groups(make_model("vgg11_bn"), torch.randn(1, 3, 32, 32))
    assert [g.root for g in groups] == VGG_ROOTS
    assert groups[0].members == [("features.25", "out"), ("features.26", "out"), ("classifier", "in")]
    assert [g.channels for g in groups] == [512, 512, 512, 512, 256, 256, 128, 64]


def test_resnet18_group_numbering(make_model):
    groups = list_groups(make_model("resnet18"), torch.randn(1, 3, 32, 32))
    assert len(groups) == 12
    roots = [g.root for g in groups]
    assert roots[1:3] == ["layer4.1.conv1", "layer4.0.conv1"]
    assert roots[4:6] == ["layer3.1.conv1", "layer3.0.conv1"]
    assert roots[10:] == ["layer1.1.conv1", "layer1.0.conv1"]
    stream0 = {name for name, side in groups[0].members if side == "out"}
    assert {"layer4.0.conv2", "layer4.0.shortcut.0", "layer4.1.conv2"} <= stream0
    assert {name for name, side in groups[0].members if side == "in"} == {"layer4.1.conv1", "linear"}
    assert ("conv1", "out") in groups[9].members


@pytest.mark.parametrize("sparsity, params", [(0.3, 7_811_388), (0.7, 5_921_493)])
def test_vgg_parameter_counts_match_the_paper(make_model, sparsity, params):
    model = make_model("vgg11_bn")
    assert sum(p.numel() for p in model.parameters()) == 9_231_114
    IntraFusionPruner(model, torch.randn(1, 3, 32, 32), fold_bn="reference").prune([1], sparsity, OptimalTransport())
    assert sum(p.numel() for p in model.parameters()) == params


def _plain_prune(model, example, root_name, pruned):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    root = dict(model.named_modules())[root_name]
    pruner = graph.get_pruner_of_module(root)
    graph.get_pruning_group(root, pruner.prune_out_channels, pruned).prune()


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["vgg11_bn", "resnet18"])
def test_identity_map_equals_plain_pruning_bitwise(make_model, builder):
    base = make_model(builder)
    example = torch.randn(1, 3, 32, 32)
    fused = copy.deepcopy(base)
    pruner = IntraFusionPruner(fused, example, fold_bn="reference")
    plain = copy.deepcopy(fused)  # folded the same way, not yet pruned
    generator = torch.Generator().manual_seed(1)
    for index in range(pruner.num_groups):
        group = full_group(pruner.graph, pruner.roots[index])
        n = len(group[0].idxs)
        pruned = sorted(torch.randperm(n, generator=generator)[: n // 3].tolist())
        kept = torch.tensor(sorted(set(range(n)) - set(pruned)))
        members = group_members(group, n, pruner.names)
        mapping = identity_map(n, kept)
        fuse_members(members, kept, mapping, mapping)
        prune_channels(pruner.graph, group, pruned)
        _plain_prune(plain, example, pruner.names[pruner.roots[index]], pruned)
    fused_state, plain_state = fused.state_dict(), plain.state_dict()
    assert fused_state.keys() == plain_state.keys()
    for key in fused_state:
        assert torch.equal(fused_state[key], plain_state[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name, index", [("vgg11_bn", 2), ("resnet18", 0), ("resnet18", 9), ("resnet18", 4)])
def test_function_preserving_merges_twins_exactly(make_model, name, index):
    x = torch.randn(4, 3, 32, 32)
    outputs = {}
    for rule in ("function_preserving", "reference"):
        model = make_model(name)
        pruner = IntraFusionPruner(model, x[:1], importance=FirstOfPairs(), fold_bn="exact")
        make_twins(model, pruner, index)
        before = model(x)
        result = pruner.prune([index], 0.5, OptimalTransport(), fusion_rule=rule)[0]
        assert result.fused and len(result.pruned) == result.channels // 2
        outputs[rule] = (model(x) - before).abs().max().item()
    assert outputs["function_preserving"] < 1e-5
    assert outputs["reference"] > 1e-2


def test_groups_are_pruned_in_sequence_with_fresh_importance(make_model):
    x = torch.randn(2, 3, 32, 32)
    together, apart = make_model("vgg11_bn"), make_model("vgg11_bn")
    IntraFusionPruner(together, x[:1], fold_bn="exact").prune([2, 1], 0.5, OptimalTransport())
    pruner = IntraFusionPruner(apart, x[:1], fold_bn="exact")
    pruner.prune([2], 0.5, OptimalTransport())
    pruner.prune([1], 0.5, OptimalTransport())
    assert torch.equal(together(x), apart(x))


def test_dimensionality_preserving_keeps_shapes_and_function(make_model):
    x = torch.randn(4, 3, 32, 32)
    sliced, zeroed = make_model("vgg11_bn"), make_model("vgg11_bn")
    shapes = {k: v.shape for k, v in zeroed.state_dict().items()}
    IntraFusionPruner(sliced, x[:1], fold_bn="exact").prune([1, 5], 0.5, OptimalTransport())
    results = IntraFusionPruner(zeroed, x[:1], fold_bn="exact").prune([1, 5], 0.5, OptimalTransport(), dimensionality_preserving=True)
    assert {k: v.shape for k, v in zeroed.state_dict().items()} == shapes
    assert torch.all(zeroed.features[22].weight[results[0].pruned] == 0)
    assert torch.all(zeroed.features[25].weight[:, results[0].pruned] == 0)
    assert torch.allclose(zeroed(x), sliced(x), atol=1e-5)


def test_default_pruning_drops_the_least_important_channels(make_model):
    model = make_model("vgg11_bn")
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 32, 32), importance="l1")
    weight = model.features[0].weight.detach().clone()
    next_weight = model.features[4].weight.detach().clone()
    scores = (weight.abs().flatten(1).sum(1) + next_weight.abs().transpose(0, 1).flatten(1).sum(1)) / 2
    expected = sorted(scores.argsort()[:32].tolist())
    result = pruner.prune([7], 0.5)[0]
    assert result.pruned == expected and not result.fused
    kept = sorted(set(range(64)) - set(expected))
    assert torch.equal(model.features[0].weight, weight[kept])


def test_gradients_are_transformed_with_the_weights(make_model):
    model = make_model("vgg11_bn")
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 32, 32))
    for param in model.parameters():
        param.grad = param.detach().clone()
    pruner.prune([1], 0.5, OptimalTransport(), fusion_rule="function_preserving")
    for layer in (model.features[22], model.features[25]):
        assert torch.allclose(layer.weight.grad, layer.weight.detach())


@pytest.mark.slow
def test_global_pruning_removes_the_requested_share(make_model):
    model = make_model("vgg11_bn")
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 32, 32), fold_bn="exact")
    results = pruner.prune("all", 0.3, OptimalTransport(), global_pruning=True)
    total = sum(r.channels for r in results)
    assert sum(len(r.pruned) for r in results) == int(total * 0.3)
    assert len({len(r.pruned) / r.channels for r in results}) > 1  # not uniform per group
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan"), 1.5])
def test_bad_sparsity(make_model, sparsity):
    pruner = IntraFusionPruner(make_model("vgg11_bn"), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got"):
        pruner.prune([1], sparsity)


def test_bad_group_index_names_the_range(make_model):
    pruner = IntraFusionPruner(make_model("vgg11_bn"), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"group index 8 is not in the model: valid indices are 0\.\.7"):
        pruner.prune([1, 8], 0.5)


def test_bad_options(make_model):
    model = make_model("vgg11_bn")
    with pytest.raises(ValueError, match="unknown importance criterion 'l3'"):
        IntraFusionPruner(model, torch.randn(1, 3, 32, 32), importance="l3")
    with pytest.raises(ValueError, match="unknown fold_bn 'yes'"):
        IntraFusionPruner(model, torch.randn(1, 3, 32, 32), fold_bn="yes")
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown fusion rule 'average'"):
        pruner.prune([1], 0.5, OptimalTransport(), fusion_rule="average")
    with pytest.raises(ValueError, match="'taylor' needs calibration_batches"):
        IntraFusionPruner(model, torch.randn(1, 3, 32, 32), importance="taylor")


def test_non_finite_weights_are_refused(make_model):
    model = make_model("vgg11_bn")
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        model.features[22].weight[3, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"features\.22\.weight contains NaN or inf"):
        pruner.prune([1], 0.5, OptimalTransport())


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def test_unfusable_group_falls_back_to_plain_pruning_with_a_warning():
    torch.manual_seed(0)
    model = WithLayerNorm()
    pruner = IntraFusionPruner(model, torch.randn(2, 8))
    with pytest.warns(UserWarning, match=r"group 0 \(root fc1\) cannot be fused because of norm"):
        result = pruner.prune([0], 0.5, OptimalTransport())[0]
    assert not result.fused and "norm" in result.fallback_reason
    assert model.fc1.out_features == 8 and model(torch.randn(2, 8)).shape == (2, 3)


def test_dimensionality_preserving_on_an_unfusable_group_zeroes_its_linear_layers():
    torch.manual_seed(0)
    model = WithLayerNorm()
    pruner = IntraFusionPruner(model, torch.randn(2, 8))
    with pytest.warns(UserWarning, match="cannot be fused"):
        result = pruner.prune([0], 0.5, OptimalTransport(), dimensionality_preserving=True)[0]
    assert model.fc1.out_features == 16
    assert torch.all(model.fc1.weight[result.pruned] == 0) and torch.all(model.fc2.weight[:, result.pruned] == 0)


class _LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.layer_scale = nn.Parameter(torch.rand(8))
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv2(self.conv1(x) * self.layer_scale.view(1, -1, 1, 1)).mean((2, 3)))


def test_a_per_channel_scale_parameter_is_fused_along_the_map():
    torch.manual_seed(0)
    model = _LayerScale().eval()
    with torch.no_grad():  # channels 4..7 are exact twins of 0..3, including their layer_scale entries
        model.conv1.weight[4:] = model.conv1.weight[:4]
        model.conv1.bias[4:] = model.conv1.bias[:4]
        model.layer_scale[4:] = model.layer_scale[:4]
    x = torch.randn(3, 3, 8, 8)
    before = model(x)
    pruner = IntraFusionPruner(model, x[:1], importance=FirstOfPairs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        result, = pruner.prune([1], 0.5, OptimalTransport(), fusion_rule="function_preserving")
    assert result.fused and model.layer_scale.shape == (4,)
    assert (model(x) - before).abs().max() < 1e-5


def test_the_reference_rule_on_several_groups_warns():
    model = _LayerScale().eval()
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 8, 8), fold_bn=None)
    with pytest.warns(UserWarning, match="use fusion_rule='function_preserving' for several groups"):
        pruner.prune("all", 0.5, OptimalTransport(), fusion_rule="reference")


def test_example_inputs_the_model_cannot_run_are_refused_in_one_line(make_model):
    with pytest.raises(ValueError, match=r"^the model does not run on example inputs of shape 1x1x32x32: ") as caught:
        IntraFusionPruner(make_model("vgg11_bn"), torch.randn(1, 1, 32, 32))
    assert "\n" not in str(caught.value)


class _UnfoldedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_the_reference_rule_leaves_an_unfolded_batchnorm_to_plain_pruning():
    # its producer rows are sums, which averaged statistics would no longer centre
    model = randomize_batchnorms(_UnfoldedBN())
    with pytest.warns(UserWarning, match="bn: per-channel statistics or scales, which only the function_preserving"):
        result, = IntraFusionPruner(model, torch.randn(1, 3, 8, 8)).prune([0], 0.5, OptimalTransport())
    assert not result.fused
