
import pytest
import torch

from tests.helpers import Chain
from torch_pruning_ext import IntraFusionPruner, OptimalTransport
from torch_pruning_ext.experiments.data import DatasetInfo, ImageSet
from torch_pruning_ext.importance import GateImportance
from torch_pruning_ext.experiments.sparse_training import (add_gates, add_thresholds, fold_parametrizations, gate_penalty,
                                               gate_values, layer_sparsity, modelled_sparsity, sparsity_loss)
from torch_pruning_ext.experiments.training import train

INFO = DatasetInfo("toy", 5, (0.5,) * 3, (0.25,) * 3)


def toy_data(count=64):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (count,), generator=generator)
    images = (labels.view(-1, 1, 1, 1) * 50 + torch.randint(0, 30, (count, 3, 8, 8), generator=generator))
    return ImageSet(images.to(torch.uint8), labels)


def test_training_loop_reduces_the_loss():
    torch.manual_seed(0)
    model = Chain()
    losses = train(model, toy_data(), INFO, epochs=6, lr=0.05, batch_size=16)
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.7


@pytest.mark.parametrize("structured", [True, False])
def test_folded_gates_leave_outputs_unchanged(structured):
    torch.manual_seed(0)
    model = Chain()
    add_gates(model, structured=structured)
    with torch.no_grad():
        for name, layer in model.named_modules():
            if hasattr(layer, "parametrizations"):
                layer.parametrizations.weight[0].scores.normal_()
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    values = gate_values(model)
    assert values["conv"].shape == ((4,) if structured else (4, 3, 3, 3))
    fold_parametrizations(model)
    assert torch.allclose(model(x), before, atol=1e-6)
    assert set(model.state_dict()) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}


def test_gate_penalty_closes_gates_during_training():
    torch.manual_seed(0)
    model = Chain()
    add_gates(model, structured=True)
    before = sum(v.sum() for v in gate_values(model).values())
    train(model, toy_data(), INFO, epochs=3, lr=0.05, batch_size=16, extra_loss=lambda m: 0.05 * gate_penalty(m),
          weight_decay=0)
    assert sum(v.sum() for v in gate_values(model).values()) < before


def test_gate_importance_ranks_closed_gates_last():
    torch.manual_seed(0)
    model = Chain()
    gates = {"conv": torch.tensor([0.9, 0.001, 0.5, 0.8])}
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 8, 8), importance=GateImportance(gates), fold_bn=None)
    result = pruner.prune([pruner.roots.index(model.conv)], 0.25, OptimalTransport())[0]
    assert result.pruned == [1]
    with pytest.raises(ValueError, match="needs a checkpoint trained with channel gates"):
        GateImportance({})


def test_modelled_sparsity_tracks_a_gaussian_tensor():
    torch.manual_seed(0)
    weight = torch.randn(200_000) * 0.05 + 0.01
    for threshold in (0.01, 0.04, 0.1):
        measured = (weight.abs() < threshold).float().mean().item()
        assert modelled_sparsity(weight, torch.tensor(threshold)).item() == pytest.approx(measured, abs=5e-3)


def test_thresholds_zero_small_weights_and_fold_to_a_plain_model():
    torch.manual_seed(0)
    model = Chain()
    attached = add_thresholds(model, pthres=1000)
    assert [layer for layer, _ in attached] == [model.fc]  # conv has 108 < 1000 weights
    with torch.no_grad():
        attached[0][1].threshold.fill_(0.02)
    loss = sparsity_loss(attached, 0.9, "adaptive")
    loss.backward()
    assert attached[0][1].threshold.grad.item() < 0  # more sparsity wanted: raise the threshold
    fold_parametrizations(model)
    assert set(model.state_dict()) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    assert torch.all(model.fc.weight.abs()[model.fc.weight != 0] > 0.02)
    assert layer_sparsity(model)["fc"] > 0 and layer_sparsity(model)["conv"] == 0
    with pytest.raises(ValueError, match="unknown sparsity-loss mode 'budget'"):
        sparsity_loss(attached, 0.5, "budget")


@pytest.mark.slow
def test_gate_scores_trained_by_adam_respond_to_lambda_and_skip_weight_decay():
    def mean_gate(lam, adam_lr):
        torch.manual_seed(0)
        model = Chain()
        scores = add_gates(model, structured=True)
        train(model, toy_data(), INFO, epochs=4, lr=0.05, batch_size=16, weight_decay=0.1,
              extra_loss=lambda m: lam * gate_penalty(m), adam_parameters=scores, adam_lr=adam_lr)
        return torch.cat(list(gate_values(model).values())).mean().item()

    initial = torch.sigmoid(torch.tensor(3.0)).item()
    assert mean_gate(0.0, 0.0) == pytest.approx(initial, abs=1e-7)  # not decayed by SGD
    open_, small, large = (mean_gate(lam, 0.5) for lam in (0.0, 0.01, 0.1))
    assert large < small - 0.2 and small < open_ - 0.02


def test_channel_gate_of_a_conv_with_batchnorm_sits_on_the_batchnorm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(8, 3, 8, 8)
    add_gates(model, structured=True, ignored=[model[4]], example_inputs=x[:1])
    assert {k: v.shape for k, v in gate_values(model).items()} == {"0": (4,)}  # named by the conv
    with torch.no_grad():
        model[1].parametrizations.weight[0].scores[1] = -30.0
    normalised = model[1](model[0](x))  # training mode: the BN cannot renormalise a closed gate away
    assert normalised[:, 1].abs().max() < 1e-6 and normalised[:, 0].abs().max() > 0.1
    model.eval()
    before = model(x)
    fold_parametrizations(model)
    assert torch.allclose(model(x), before, atol=1e-6)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                       "1.running_var", "1.num_batches_tracked", "4.weight", "4.bias"}
