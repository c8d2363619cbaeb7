import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from torch_pruning_ext import CRITERIA, IntraFusionPruner, build_importance
from torch_pruning_ext.groups import full_group
from torch_pruning_ext.importance import channel_independence


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _group(model, layer):
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 8, 8), fold_bn=None)
    return pruner, full_group(pruner.graph, layer)


def _tiny_with_dead_channel(dead=2):
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.conv1.weight[dead] = 0
        model.conv1.bias[dead] = 0
        model.conv2.weight[:, dead] = 0
    return model


@pytest.mark.parametrize("criterion", ["l1", "l2", "linf", "lamp"])
def test_dead_channel_ranks_last_for_magnitude_criteria(criterion):
    model = _tiny_with_dead_channel()
    _, group = _group(model, model.conv1)
    scores = build_importance(criterion)(group)
    assert scores.shape == (6,) and scores.argmin().item() == 2


def test_l1_and_linf_values():
    model = _tiny_with_dead_channel()
    _, group = _group(model, model.conv1)
    rows = model.conv1.weight.detach().abs().flatten(1)
    cols = model.conv2.weight.detach().abs().transpose(0, 1).flatten(1)
    l1 = (rows.sum(1) + cols.sum(1)) / 2
    assert torch.allclose(build_importance("l1")(group), l1 / l1.mean())
    linf = (rows.amax(1) + cols.amax(1)) / 2
    assert torch.allclose(build_importance("linf")(group), linf / linf.mean())


def _batches(count=2):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator))
            for _ in range(count)]


@pytest.mark.parametrize("criterion", ["taylor", "chip", "taylor_fm", "thinet"])
def test_data_criteria_rank_a_dead_channel_last(criterion):
    model = _tiny_with_dead_channel()
    pruner, group = _group(model, model.conv1)
    importance = build_importance(criterion)
    importance.prepare(model, group, _batches())
    scores = importance(group)
    assert scores.shape == (6,) and scores.argmin().item() == 2
    if criterion != "thinet":  # thinet scores are ranks; the others are zero for a dead channel
        assert scores[2].abs() < 1e-6


def test_taylor_without_gradients_is_an_error():
    model = _tiny_with_dead_channel()
    _, group = _group(model, model.conv1)
    with pytest.raises(RuntimeError, match="needs gradients"):
        build_importance("taylor")(group)


def test_channel_independence_of_a_duplicate_and_a_zero_row():
    torch.manual_seed(0)
    features = torch.randn(3, 4, 10)
    features[:, 1] = features[:, 0]  # a duplicated channel is less independent than a unique one
    features[:, 3] = 0
    scores = channel_independence(features)
    assert scores[3] == pytest.approx(0, abs=1e-9)
    assert scores[0] < scores[2] and scores[1] < scores[2]


def test_random_is_seeded_and_names_are_checked():
    model = _tiny_with_dead_channel()
    _, group = _group(model, model.conv1)
    torch.manual_seed(3)
    first = build_importance("random")(group)
    torch.manual_seed(3)
    assert torch.equal(first, build_importance("random")(group))
    # CRITERIA is what build_importance accepts: every name builds, and a rejected name is told all of them
    for name in CRITERIA:
        assert isinstance(build_importance(name, gates={"x": torch.ones(1)}), tp.importance.Importance), name
    with pytest.raises(ValueError, match="unknown importance criterion 'l3'; choose one of: " + ", ".join(CRITERIA)):
        build_importance("l3")
    custom = tp.importance.GroupMagnitudeImportance(p=2)
    assert build_importance(custom) is custom


@pytest.mark.parametrize("under_no_grad", [False, True])
def test_pruner_uses_calibration_batches_for_taylor(under_no_grad):
    model = _tiny_with_dead_channel()
    with torch.set_grad_enabled(not under_no_grad):  # the graph trace and Taylor's backward still work
        pruner = IntraFusionPruner(model, torch.randn(1, 3, 8, 8), importance="taylor", fold_bn=None,
                                   calibration_batches=_batches())
        result = pruner.prune([pruner.roots.index(model.conv1)], 0.1)[0]
    assert result.pruned == [2] and model.conv1.out_channels == 5
    assert all(p.grad is None for p in model.parameters())


def test_thinet_prefers_the_channel_that_reconstructs_the_next_layer():
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.conv2.weight[:, 4] *= 0.01  # channel 4 barely reaches conv2's output
    pruner, group = _group(model, model.conv1)
    importance = build_importance("thinet")
    importance.prepare(model, group, _batches())
    assert importance(group).argmin().item() == 4


def test_thinet_greedy_order_on_a_known_case():
    from torch_pruning_ext.importance import greedy_removal_order
    contributions = torch.tensor([[1.0, -1.0, 5.0, 0.1], [1.0, -1.0, 5.0, 0.1]])
    # channels 0 and 1 cancel each other: after removing 3 (smallest), 0 or 1, then its partner
    order = greedy_removal_order(contributions)
    assert order[3] == 0 and order[2] == 3 and set(order[:2].tolist()) == {1.0, 2.0}


def test_feature_map_taylor_is_normalised_per_layer():
    model = _tiny_with_dead_channel()
    pruner, group = _group(model, model.conv1)
    importance = build_importance("taylor_fm")
    importance.prepare(model, group, _batches())
    scores = importance(group)
    assert scores.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_data_criteria_list_matches_the_objects():
    from torch_pruning_ext.importance import DATA_CRITERIA, needs_data
    built = {name: build_importance(name, gates={"x": torch.ones(1)}) for name in CRITERIA}
    assert {name for name, imp in built.items() if needs_data(imp)} == set(DATA_CRITERIA)


@pytest.mark.parametrize("criterion", ["taylor", "thinet"])
def test_shared_score_cache_skips_repeat_passes_and_changes_nothing(criterion, monkeypatch):
    from torch_pruning_ext import OptimalTransport
    from torch_pruning_ext.importance import TaylorImportance, ThiNetImportance
    kind = TaylorImportance if criterion == "taylor" else ThiNetImportance
    passes = []
    original = kind.prepare
    monkeypatch.setattr(kind, "prepare", lambda self, *args: (passes.append(1), original(self, *args)))
    base = _tiny_with_dead_channel()

    def pruned(cache, groups, sparsity):
        model = Tiny().eval()
        model.load_state_dict(base.state_dict())
        pruner = IntraFusionPruner(model, torch.randn(1, 3, 8, 8), importance=criterion, fold_bn=None,
                                   calibration_batches=_batches(), score_cache=cache)
        pruner.prune(groups, sparsity, OptimalTransport())
        return model

    cache = {}
    for sparsity in (0.3, 0.6):  # the same group of copies of one model: one pass over the batches
        fresh = pruned(None, [0, 1], sparsity)
        passes.clear()
        cached, again = pruned(cache, [0, 1], sparsity), pruned(cache, [0, 1], sparsity)
        assert len(passes) == (3 if sparsity == 0.3 else 2)  # group 1 is scored after group 0 changed it
        for a, b in zip(fresh.state_dict().values(), list(cached.state_dict().values())):
            assert torch.equal(a, b)
        assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), again.state_dict().values()))
    assert sorted(cache) == [0]
    passes.clear()
    pruned(cache, [1], 0.5)  # another first group: measured once, then cached
    pruned(cache, [1], 0.5)
    assert len(passes) == 1 and sorted(cache) == [0, 1]


class TwoOutputs(nn.Module):
    """Hidden neurons 0-2 feed only output 1, neurons 3-5 only output 0."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        with torch.no_grad():
            self.fc1.bias.fill_(1.0)  # every neuron active
            self.fc1.weight.abs_()
            self.fc2.weight[0, :3] = 0
            self.fc2.weight[1, 3:] = 0

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_user_given_loss_steers_the_gradient_criteria():
    from torch_pruning_ext import compress
    model = TwoOutputs().eval()
    x = torch.rand(32, 4)
    calls = []

    def one_output(column):
        def loss(outputs, inputs, labels):
            calls.append((inputs.shape, labels))
            return outputs[:, column].sum()
        return loss
    for criterion in ("taylor", "taylor_fm"):
        for column, kept in ((0, slice(3, 6)), (1, slice(0, 3))):  # the neurons of the output the loss reads stay
            small, _ = compress(model, x[:1], 0.5, "default", x, repair="none", importance=criterion,
                                loss=one_output(column))
            assert torch.equal(small.fc1.weight, model.fc1.weight[kept]), (criterion, column)
    assert calls[0][0] == (32, 4) and calls[0][1].shape == (32,)  # labels: the model's own predictions


def test_a_loss_for_a_criterion_without_gradients_is_refused():
    from torch_pruning_ext import compress
    with pytest.raises(ValueError, match="only, not by importance 'l1'"):
        compress(TwoOutputs(), torch.rand(1, 4), 0.5, importance="l1", loss=lambda o, i, y: o.sum())
    with pytest.raises(TypeError, match="loss must be a function"):
        compress(TwoOutputs(), torch.rand(1, 4), 0.5, importance="taylor", loss=3)
