"""Models the library was not written for: ignored layers named any way, widths forward() reads from
attributes, permutes before a flatten, BatchNorm after the activation, and bad inputs to compress()."""
import copy
import importlib
import warnings

import pytest
import torch
import torch.nn as nn

from tests.helpers import FirstOfPairs
from torch_pruning_ext import ClusterFolding, IntraFusionPruner, OptimalTransport, compress, fold_batchnorms
from torch_pruning_ext.bn_folding import post_activation_chains
from torch_pruning_ext.groups import trace_graph
from torch_pruning_ext.serialization import load_pruned, save_pruned


def sequential_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(4),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    return model.eval()


class Frames(nn.Module):
    """An audio-style net: conv -> ReLU -> BN -> max-pool, and a classifier fed by a reshape whose
    width is an attribute (permuted first when `permute`)."""

    def __init__(self, permute: bool, channels=(8, 6)):
        super().__init__()
        torch.manual_seed(1)
        self.permute = permute
        self.pad1, self.conv1 = nn.ZeroPad2d((0, 0, 2, 2)), nn.Conv2d(1, channels[0], (5, 1))
        self.bn1, self.pool1 = nn.BatchNorm2d(channels[0]), nn.MaxPool2d((2, 1))
        self.pad2, self.conv2 = nn.ZeroPad2d((0, 0, 1, 1)), nn.Conv2d(channels[0], channels[1], (3, 1))
        self.bn2, self.pool2 = nn.BatchNorm2d(channels[1]), nn.MaxPool2d((2, 1))
        self.in_features = channels[1] * 4
        self.classifier = nn.Linear(self.in_features, 5)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(0.2, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 2.0)
            bn.bias.data.normal_()
        self.eval()

    def forward(self, x):
        x = x.view(-1, 1, 16, 1)
        x = self.pool1(self.bn1(torch.relu(self.conv1(self.pad1(x)))))
        x = self.pool2(self.bn2(torch.relu(self.conv2(self.pad2(x)))))
        if self.permute:
            x = x.permute(0, 2, 1, 3)
        return self.classifier(x.reshape(-1, self.in_features))


@pytest.mark.parametrize("ignored", [lambda m: [m[3]], lambda m: ["3"], lambda m: [nn.Linear, m[3]], lambda m: m[3]])
def test_ignored_layers_from_the_callers_model_by_name_or_type(ignored):
    model, example = sequential_cnn(), torch.randn(1, 3, 32, 32)
    small, summary = compress(model, example, 0.5, method="default", ignored_layers=ignored(model))
    assert small is not model and summary.channels["3"] == [16, 16]  # the ignored layer kept its channels
    assert summary.channels["0"] == [8, 4] and summary.channels["10"] == [10, 10]  # output layer protected
    assert small(example).shape == (1, 10)


def test_ignored_layers_that_match_nothing_are_refused():
    model, example = sequential_cnn(), torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"no module named '33' in the model; did you mean '3'"):
        compress(model, example, ignored_layers=["33"])
    with pytest.raises(ValueError, match="is not a module of the model"):
        compress(model, example, ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="has no Conv3d module"):
        compress(model, example, ignored_layers=[nn.Conv3d])


def test_output_layers_are_pruned_only_when_asked():
    model, example = sequential_cnn(), torch.randn(1, 3, 32, 32)
    pruner = IntraFusionPruner(copy.deepcopy(model), example, prune_output_layers=True)
    assert "10" in [group.root for group in pruner.groups()]
    pruner.prune("all", 0.5)
    assert pruner.model(example).shape == (1, 5)
    assert "10" not in [group.root for group in IntraFusionPruner(copy.deepcopy(model), example).groups()]


def test_width_read_from_an_attribute_follows_the_pruned_layer(tmp_path):
    model, example = Frames(permute=False), torch.randn(2, 16)
    small, summary = compress(model, example, 0.5, method="default", repair="none")
    assert summary.size_attributes == {"in_features": (24, 12)} and not summary.skipped_groups
    assert small.in_features == 12 and small(example).shape == (2, 5)
    # the plain slicing is right: equal to silencing the removed channels of the unpruned model
    save_pruned(small, tmp_path / "frames.pt")
    loaded = load_pruned(tmp_path / "frames.pt", builder=lambda: Frames(permute=False))
    assert loaded.in_features == 12 and torch.equal(loaded(example), small(example))


def test_a_permute_before_the_flatten_leaves_that_group_unpruned_and_reported():
    model, example = Frames(permute=True), torch.randn(2, 16)
    with pytest.warns(UserWarning, match=r"conv2\): torch-pruning maps its channels through permute"):
        small, summary = compress(model, example, 0.5, method="fold", repair="none")
    assert list(summary.skipped_groups) == ["conv2"] and summary.channels["conv2"] == [6, 6]
    assert summary.channels["conv1"] == [8, 4]
    # the group that was pruned changed nothing it should not have: fusing twins is exact
    assert small(example).shape == model(example).shape


class Ambiguous(nn.Module):
    """forward() reads `width` (16), the size of two layers of which only one may be pruned."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Linear(4, 16), nn.Linear(4, 16)
        self.width = 16
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)).reshape(-1, self.width)) + self.b(x)[:, :3]


def test_an_attribute_two_widths_claim_is_not_guessed_the_group_is_skipped():
    model, example = Ambiguous().eval(), torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, summary = compress(model, example, 0.5, method="default", repair="none", ignored_layers=["b"])
    assert list(summary.skipped_groups) == ["a"] and "RuntimeError" in summary.skipped_groups["a"]
    assert small.width == 16 and small(example).shape == (2, 3)


def test_post_activation_batchnorm_gives_its_scale_to_the_layer_exactly():
    model, example = Frames(permute=False), torch.randn(8, 16)
    with torch.no_grad():
        model.bn2.weight[0] = -0.7  # a negative scale keeps its sign in the BN
    before = model(example)
    pairs = fold_batchnorms(model, example[:1])
    assert {(p.layer, p.batchnorm, p.activation) for p in pairs} == {("conv1", "bn1", "ReLU"),
                                                                        ("conv2", "bn2", "ReLU")}
    assert (model(example) - before).abs().max() < 1e-5
    assert model.bn2.weight[0] == -1 and torch.all(model.bn2.weight[1:] == 1)
    assert torch.all(model.bn2.running_mean == 0)


def test_conv_feeding_two_layers_is_not_scaled_through_its_activation():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.side = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(torch.relu(y)) + self.side(y)
    assert post_activation_chains(trace_graph(Fork().eval(), torch.randn(1, 3, 4, 4))) == []


@pytest.mark.parametrize("coupling", [lambda: OptimalTransport(), lambda: ClusterFolding()])
def test_post_activation_batchnorm_twins_merge_exactly(coupling):
    model, x = Frames(permute=False, channels=(8, 6)), torch.randn(16, 16)
    with torch.no_grad():  # channel c + 4 of conv1 computes channel c at another scale, undone by bn1
        for c in range(4):
            r = 0.5 + c
            model.conv1.weight[c + 4] = model.conv1.weight[c] * r
            model.conv1.bias[c + 4] = model.conv1.bias[c] * r
            model.bn1.running_mean[c + 4] = model.bn1.running_mean[c] * r
            model.bn1.running_var[c + 4] = model.bn1.running_var[c] * r * r
            model.bn1.weight[c + 4], model.bn1.bias[c + 4] = model.bn1.weight[c], model.bn1.bias[c]
            model.conv2.weight[:, c + 4] = model.conv2.weight[:, c]  # so the transport cost pairs them too
        model.bn1.eps = 0.0
    before = model(x)
    pruner = IntraFusionPruner(model, x[:1], importance=FirstOfPairs(), fold_bn="exact")
    index = [g.root for g in pruner.groups()].index("conv1")
    result = pruner.prune([index], 0.5, coupling(), fusion_rule="function_preserving")[0]
    assert result.fused and result.pruned == [4, 5, 6, 7]
    assert (model(x) - before).abs().max() < 1e-5


def test_bad_inputs_are_refused_in_one_line_before_any_work():
    model, example = sequential_cnn(), torch.randn(1, 3, 32, 32)
    state = copy.deepcopy(model.state_dict())
    cases = {"NaN or inf values": dict(calibration=torch.full((4, 3, 32, 32), float("nan"))),
             "does not run on inputs shaped 4x4x32x32": dict(calibration=torch.randn(4, 4, 32, 32)),
             "dtype torch.int64": dict(calibration=torch.randint(0, 3, (4, 3, 32, 32))),
             "calibration data is empty": dict(calibration=torch.randn(0, 3, 32, 32))}
    for message, kwargs in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            compress(model, example, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"example_inputs: the model does not run on inputs shaped 1x3x30x30"):
        compress(model, torch.randn(1, 3, 30, 30))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_data_driven_criteria_run_through_compress_without_labels():
    model, example = sequential_cnn(), torch.randn(1, 3, 32, 32)
    small, summary = compress(model, example, 0.5, method="default", importance="taylor",
                              calibration=torch.randn(16, 3, 32, 32), repair="none")
    assert summary.channels["3"] == [16, 8] and small(example).shape == (1, 10)
    labelled = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
    assert compress(model, example, 0.5, importance="taylor", calibration=labelled)[0](example).shape == (1, 10)


def test_a_repair_that_produces_non_finite_weights_is_refused(monkeypatch):
    repair_module = importlib.import_module("torch_pruning_ext.repair")

    def poisoned(job):
        with torch.no_grad():
            next(job.pruned.parameters()).fill_(float("nan"))
        return {}
    monkeypatch.setitem(repair_module.REPAIRS, "datafree", poisoned)
    with pytest.raises(RuntimeError, match="non-finite outputs"):
        compress(sequential_cnn(), torch.randn(1, 3, 32, 32), 0.5, method="fold", repair="datafree")


def test_reconstruct_fits_inputs_far_from_zero_as_well_as_centred_ones():
    """Inputs sitting far from zero (a ReLU followed by a BatchNorm shift) once made the float32 Gram
    products cancel: the refit must recover a perturbed layer just as well as for centred inputs."""
    from torch_pruning_ext.reconstruction import repair_by_reconstruction
    explained = {}
    for offset in (0.0, 300.0):
        torch.manual_seed(3)
        original = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
        with torch.no_grad():
            original[0].bias += offset
        pruned = copy.deepcopy(original)
        with torch.no_grad():
            pruned[2].weight += 0.05 * torch.randn_like(pruned[2].weight)
        x = torch.randn(4096, 16)
        report = repair_by_reconstruction(original, pruned, {}, x)
        explained[offset] = report["2"]["explained"]
        error = (pruned(x) - original(x)).norm() / (original(x) - original(x).mean(0)).norm()
        assert error < 1e-2, (offset, float(error))
    assert explained[300.0] > 0.9999 and explained[0.0] > 0.9999


def test_a_frozen_model_is_pruned_like_a_trainable_one():
    model, example = sequential_cnn(), torch.randn(1, 3, 32, 32)
    frozen = copy.deepcopy(model).requires_grad_(False)
    small, summary = compress(frozen, example, 0.5, method="default", repair="none")
    reference, _ = compress(model, example, 0.5, method="default", repair="none")
    assert summary.channels["3"] == [16, 8] and torch.equal(small(example), reference(example))
    assert not any(p.requires_grad for p in frozen.parameters())


class CachedOutputs(nn.Module):
    """Returns what a Hugging Face model does: a dict with logits, a nested tuple of tensors that
    autograd cannot trace back (a cache) and a plain object."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        hidden = torch.relu(self.fc1(x))
        return {"logits": self.fc2(hidden), "past": ((x.detach() * 2,),), "config": "cfg"}


def test_outputs_with_untraceable_parts_are_traced_through_their_tensors():
    torch.manual_seed(0)
    model = CachedOutputs().eval()
    small, summary = compress(model, torch.randn(1, 8), 0.5, "fold", repair="none")
    assert summary.channels["fc1"] == [16, 8]
    assert small(torch.randn(2, 8))["logits"].shape == (2, 3)


def test_protocol_rows_name_the_groups_left_unpruned():
    from torch_pruning_ext.experiments.protocol import Protocol, Settings
    model = Frames(permute=True)
    inputs, labels = torch.randn(32, 16), torch.randint(0, 5, (32,))
    protocol = Protocol(model, Settings("frames", "fashion-mnist"), inputs, labels, batch_size=16)
    with pytest.warns(UserWarning, match="maps its channels through permute"):
        row = protocol.run_cell("all", 0.5, "default")
    assert row["skipped_groups"] == "0" and protocol.prepared.groups[0].root == "conv2"
    assert protocol.run_cell("all", 0.5, "default")["skipped_groups"] == row["skipped_groups"]


def test_a_group_search_that_does_not_end_leaves_its_layer_unpruned(monkeypatch):
    groups_module = importlib.import_module("torch_pruning_ext.groups")
    monkeypatch.setattr(groups_module, "GROUP_SEARCH_VISITS_PER_NODE", 0)
    monkeypatch.setattr(groups_module, "GROUP_SEARCH_MIN_VISITS", 1)  # every search "runs away" after one visit
    model, example = sequential_cnn(), torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"dependency search does not end for 7, 3, 0 .*left unpruned"):
        small, summary = compress(model, example, 0.5, method="fold", repair="none")
    assert summary.channels == {"0": [8, 8], "3": [16, 16], "7": [16, 16], "10": [10, 10]}
    assert torch.allclose(small(example), model(example), atol=1e-5)  # nothing pruned: BN folding only
