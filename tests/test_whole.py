"""Whole-network compression: least-squares reconstruction, Model Folding, the one-call API."""
import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from torch_pruning_ext import ClusterFolding, IntraFusionPruner, compress, fold_batchnorms, repair_by_reconstruction
from torch_pruning_ext.folding import kmeans
from torch_pruning_ext.pruner import _capped_plan, kept_count


def _folded(make_model, name):
    model = make_model(name)
    fold_batchnorms(model, torch.randn(1, 3, 32, 32), "exact")
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_reconstruct_on_an_unpruned_model_changes_no_output(make_model, name):
    original = _folded(make_model, name)
    copied = copy.deepcopy(original)
    inputs = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = repair_by_reconstruction(original, copied, {}, inputs, cost=float("inf"))
    convs = [n for n, m in copied.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert set(report) == set(convs) and all(r["mode"] == "output" for r in report.values())
    assert all(r["explained"] > 0.999 for r in report.values())
    x = torch.randn(6, 3, 32, 32)
    assert torch.allclose(copied(x), original(x), atol=1e-5, rtol=1e-4)


class _Redundant(nn.Module):
    """conv1's channel 3 is 0.5 * channel 0 - 2 * channel 1 (weights and bias): pruning it loses nothing
    that the next layer cannot get back from the kept channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)
        with torch.no_grad():
            self.conv1.weight[3] = 0.5 * self.conv1.weight[0] - 2 * self.conv1.weight[1]
            self.conv1.bias[3] = 0.5 * self.conv1.bias[0] - 2 * self.conv1.bias[1]

    def forward(self, x):
        return self.head(torch.relu(self.conv2(self.conv1(x))).mean((2, 3)))


def _redundant_pruned():
    """The _Redundant model, a copy with its redundant channel plainly pruned, and calibration inputs."""
    original = _Redundant().eval()
    pruned = copy.deepcopy(original)
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=torch.randn(1, 3, 8, 8))
    graph.get_pruning_group(pruned.conv1, tp.prune_conv_out_channels, [3]).prune()
    return original, pruned, torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_reconstruct_restores_an_exactly_redundant_channel():
    original, pruned, inputs = _redundant_pruned()
    x = torch.randn(5, 3, 8, 8)
    assert not torch.allclose(pruned(x), original(x), atol=1e-2)  # plain pruning changed the function
    report = repair_by_reconstruction(original, pruned, {"conv1": torch.tensor([0, 1, 2])}, inputs, ridge=1e-10)
    assert report["conv2"]["explained"] > 1 - 1e-6
    assert torch.allclose(pruned(x), original(x), atol=1e-4)
    assert torch.allclose(pruned.conv1.weight, original.conv1.weight[:3])  # kept channels untouched


def test_reconstruct_in_input_space_restores_it_too():
    original, pruned, inputs = _redundant_pruned()
    report = repair_by_reconstruction(original, pruned, {"conv1": torch.tensor([0, 1, 2])}, inputs, ridge=1e-10,
                                      intercept=False, space="input")
    assert report["conv2"]["mode"] == "input"
    x = torch.randn(5, 3, 8, 8)
    assert torch.allclose(pruned(x), original(x), atol=1e-4)


def test_reconstruct_rejects_a_bad_space(make_model):
    model = _folded(make_model, "vgg11_bn")
    with pytest.raises(ValueError, match="unknown reconstruction space 'patch'; choose one of: output, input"):
        repair_by_reconstruction(model, copy.deepcopy(model), {}, torch.randn(2, 3, 32, 32), space="patch")


class _Twins(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():  # channels 3, 4, 5 are twins of 0, 1, 2
            self.conv1.weight[3:] = self.conv1.weight[:3]
            self.conv1.bias[3:] = self.conv1.bias[:3]

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_fold_merges_twin_channels_without_changing_the_function():
    model = _Twins().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 10, 10)
    pruner = IntraFusionPruner(model, x[:1], fold_bn=None)
    conv1_group = [g.index for g in pruner.groups() if g.root == "conv1"]
    result, = pruner.prune(conv1_group, 0.5, ClusterFolding(), fusion_rule="function_preserving")
    assert result.fused and model.conv1.out_channels == 3
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    # default pruning of the same channels does change it
    plain = copy.deepcopy(reference)
    IntraFusionPruner(plain, x[:1], fold_bn=None).prune(conv1_group, 0.5)
    assert not torch.allclose(plain(x), reference(x), atol=1e-3)


def test_kmeans_finds_separated_clusters_and_leaves_none_empty():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(5, 2, generator=generator) for c in centres])
    labels = kmeans(points, 3)
    assert all(len(set(labels[i * 5:(i + 1) * 5].tolist())) == 1 for i in range(3))
    assert len(set(labels.tolist())) == 3
    identical = torch.ones(6, 2)  # all points equal: still k non-empty clusters
    assert torch.bincount(kmeans(identical, 4), minlength=4).min() >= 1


def test_capped_global_plan_meets_the_budget_without_exceeding_the_cap():
    scores = {0: torch.tensor([0.1, 0.2, 0.3, 0.4]), 1: torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0, 10.0])}
    plan = _capped_plan(scores, budget=5, cap=0.5)
    assert sorted(plan[0]) == [0, 1]  # the cap stops group 0 at half its channels
    assert sorted(plan[1]) == [0, 1, 2]  # the rest of the budget comes from the next lowest scores
    assert sum(map(len, plan.values())) == 5
    assert kept_count(4, 0.5) == 2


def test_global_cap_needs_global_pruning(make_model):
    model = make_model("vgg11_bn")
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 32, 32), fold_bn=None)
    with pytest.raises(ValueError, match="pass global_pruning=True"):
        pruner.prune("all", 0.5, max_group_sparsity=0.6)


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [("vgg11_bn", "intra_fusion_fp"), ("resnet18", "default"),
                                         ("resnet18", "fold")])
def test_compress_prunes_the_whole_network_and_reconstruct_brings_outputs_back(make_model, name, method):
    torch.manual_seed(0)
    model = make_model(name)
    example = torch.randn(1, 3, 32, 32)
    calibration = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    steps = []
    small, summary = compress(model, example, 0.5, method, calibration, progress=lambda d, t: steps.append((d, t)))
    unrepaired, plain = compress(model, example, 0.5, method, repair="none")
    assert summary.repair == "reconstruct" and plain.repair == "none"
    assert small(example).shape == (1, 10)
    assert summary.params_after == plain.params_after < 0.35 * summary.params_before
    assert summary.macs_after < 0.4 * summary.macs_before
    assert steps[-1][0] == steps[-1][1] and len(steps) == steps[-1][1]
    assert all(after <= before for before, after in summary.channels.values())
    assert summary.fused_groups == (0 if method == "default" else steps[-1][1] - len(summary.unfused_groups))
    with torch.no_grad():
        target = model(calibration)
        assert (small(calibration) - target).norm() < (unrepaired(calibration) - target).norm()
    assert sum(p.numel() for p in model.parameters()) == summary.params_before  # the input is not changed
    assert summary.to_dict()["params_ratio"] == pytest.approx(summary.params_after / summary.params_before)


def test_compress_reads_a_dataloader_and_rejects_bad_options(make_model):
    model = make_model("vgg11_bn")
    example = torch.randn(1, 3, 32, 32)
    images = torch.randn(12, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(12)), batch_size=5)
    _, summary = compress(model, example, 0.3, "default", loader, calibration_samples=8)
    assert summary.repair == "reconstruct"
    with pytest.raises(ValueError, match="unknown method 'prune'; choose one of: default, intra_fusion"):
        compress(model, example, 0.5, "prune")
    with pytest.raises(ValueError, match="repair 'reconstruct' needs calibration data"):
        compress(model, example, 0.5, "fold", repair="reconstruct")
    with pytest.raises(ValueError, match="unknown schedule 'local'"):
        compress(model, example, 0.5, schedule="local")
    with pytest.raises(ValueError, match=r"max_layer_sparsity=0.8 caps the global schedule only; the schedule is "
                                         r"'uniform': pass schedule='global'$"):  # no command-line flag in the library
        compress(model, example, 0.5, max_layer_sparsity=0.8)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got 1.5"):
        compress(model, example, 1.5)


def test_variance_repair_leaves_twins_alone_and_restores_orthogonal_merges():
    from torch_pruning_ext.pruner import GroupResult
    from torch_pruning_ext.repair import repair_variance

    class WithBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    unfolded = WithBN().eval()
    with torch.no_grad():
        unfolded.bn.bias.copy_(torch.tensor([1.0, 3.0, -2.0, -2.0]))
        unfolded.conv.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 1.0, 0]])
                                   .view(4, 4, 1, 1))  # channels 0, 1 orthogonal; 2, 3 twins
    folded = copy.deepcopy(unfolded)
    fold_batchnorms(folded, torch.randn(1, 4, 2, 2), "exact")
    pruned = copy.deepcopy(folded)
    average = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], dtype=torch.float64)
    with torch.no_grad():  # what fusion with the averaging map and slicing leave
        merged_w = torch.einsum("kn,nchw->kchw", average.float(), folded.conv.weight)
        merged_b = average.float() @ folded.conv.bias
    pruned.conv = nn.Conv2d(4, 2, 1)
    with torch.no_grad():
        pruned.conv.weight.copy_(merged_w)
        pruned.conv.bias.copy_(merged_b)
    result = GroupResult(0, 4, [1, 3], True, producers=["conv"], producer_map=average)
    repair_variance(unfolded, folded, pruned, [result], {"conv": "bn"})
    scale = 2 ** 0.5  # two uncorrelated channels averaged: the spread fell by sqrt(2)
    centre = 0.5 * (1.0 + 3.0)
    assert torch.allclose(pruned.conv.weight[0], scale * merged_w[0])
    assert torch.allclose(pruned.conv.bias[0], scale * merged_b[0] + (1 - scale) * centre)
    assert torch.allclose(pruned.conv.weight[1], merged_w[1]) and torch.allclose(pruned.conv.bias[1], merged_b[1])


class TokenNet(nn.Module):
    """Token ids and an attention mask as keyword inputs, a dict as output (a Hugging Face-style call)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, input_ids, attention_mask):
        hidden = self.fc2(torch.relu(self.fc1(self.embed(input_ids))))
        mask = attention_mask.unsqueeze(-1).float()
        return {"logits": self.head((hidden * mask).sum(1) / mask.sum(1))}


def test_keyword_inputs_calibrate_reconstruct_and_rank(capsys):
    torch.manual_seed(0)
    model = TokenNet().eval()
    ids, mask = torch.randint(0, 50, (64, 12)), (torch.rand(64, 12) > 0.2).long()
    mask[:, 0] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    example = {"input_ids": ids[:1], "attention_mask": mask[:1]}

    def error(small):
        with torch.no_grad():
            return float((small(**batch)["logits"] - model(**batch)["logits"]).abs().mean())
    plain, summary = compress(model, example, 0.5, "fold", repair="none")
    refit, _ = compress(model, example, 0.5, "fold", batch)  # one dict of tensors
    chunks = [{key: value[i:i + 16] for key, value in batch.items()} for i in range(0, 64, 16)]
    streamed, _ = compress(model, example, 0.5, "fold", iter(chunks))  # a loader of dict batches
    assert summary.channels == {"fc1": [32, 16], "fc2": [16, 8], "head": [5, 5]}
    assert error(refit) < 0.5 * error(plain)
    assert torch.equal(refit.fc1.weight, streamed.fc1.weight) and torch.equal(refit.fc2.weight, streamed.fc2.weight)
    ranked, _ = compress(model, example, 0.5, "default", batch, importance="taylor")  # labels: its own predictions
    assert ranked.fc1.out_features == 16
    assert capsys.readouterr().out == ""  # the library prints nothing (torch-pruning's counter notes included)
    with pytest.raises(ValueError, match=r"calibration: the model does not run on inputs shaped \{input_ids: 4x12\}"):
        compress(model, example, 0.5, "fold", {"input_ids": ids[:4]})
