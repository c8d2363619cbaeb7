import warnings

import numpy as np
import pytest
import torch

from torch_pruning_ext import OptimalTransport, identity_map, optimal_transport, transport_maps


def test_coupling_has_the_requested_marginals():
    torch.manual_seed(0)
    features, importance = torch.randn(8, 5), torch.rand(8)
    kept = torch.tensor([0, 2, 5, 7])
    plan = OptimalTransport(source_prob="importance", target_prob="importance").coupling(features, importance, kept)
    assert plan.dtype == torch.float64 and plan.shape == (8, 4)
    assert torch.allclose(plan.sum(1), (importance / importance.sum()).double(), atol=1e-12)
    assert torch.allclose(plan.sum(0), (importance[kept] / importance[kept].sum()).double(), atol=1e-12)


def test_kept_channels_keep_their_own_mass_when_it_fits():
    torch.manual_seed(0)
    features = torch.randn(6, 4)
    kept = torch.tensor([1, 3, 4])
    plan = OptimalTransport().coupling(features, None, kept)
    for j, channel in enumerate(kept):
        assert plan[channel, j] == pytest.approx(1 / 6)


def test_zero_norm_channel_and_zero_importance_give_a_valid_map():
    features = torch.randn(5, 3)
    features[2] = 0
    for transport in (OptimalTransport(source_prob="importance", target_prob="importance"),
                      OptimalTransport(target="cluster_centroid")):
        plan = transport.coupling(features, torch.zeros(5), torch.tensor([0, 1, 3]))
        assert torch.isfinite(plan).all()
        assert plan.sum().item() == pytest.approx(1.0)
        for rule in ("reference", "function_preserving"):
            producer, consumer = transport_maps(plan, rule)
            assert torch.isfinite(producer).all() and torch.isfinite(consumer).all()


def test_reference_map_sums_and_function_preserving_map_averages():
    plan = torch.tensor([[0.25, 0.0], [0.25, 0.0], [0.0, 0.25], [0.0, 0.25]], dtype=torch.float64)
    producer, consumer = transport_maps(plan, "reference")
    assert torch.equal(producer, consumer)
    assert torch.equal(consumer, torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float64))
    producer, consumer = transport_maps(plan, "function_preserving")
    assert torch.equal(producer, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], dtype=torch.float64))
    assert torch.equal(consumer, torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float64))


def test_identity_map():
    assert torch.equal(identity_map(4, torch.tensor([1, 3])),
                       torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64))


def test_cluster_centroids_use_k_targets():
    torch.manual_seed(0)
    features = torch.cat([torch.randn(4, 6) * 0.01 + 5, torch.randn(4, 6) * 0.01 - 5])
    plan = OptimalTransport(target="cluster_centroid").coupling(features, None, torch.tensor([0, 4]))
    assert plan.shape == (8, 2)
    # each tight cluster goes to one centroid
    assert set((plan[:4] > 0).nonzero()[:, 1].tolist()) | set((plan[4:] > 0).nonzero()[:, 1].tolist()) == {0, 1}
    assert (plan[:4] > 0).sum(0).max() == 4


def test_sinkhorn_is_close_to_exact_on_a_small_problem():
    torch.manual_seed(0)
    features, kept = torch.randn(16, 8), torch.arange(0, 16, 2)
    exact = OptimalTransport().coupling(features, None, kept)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # POT's "did not converge" is not passed on when the plan is fine
        approx = OptimalTransport(solver="sinkhorn", sinkhorn_reg=0.001).coupling(features, None, kept)
    assert np.allclose(approx.sum(1), 1 / 16, atol=1e-3)
    assert (approx - exact).abs().sum() < 0.2


def test_sinkhorn_warns_when_its_plan_moves_the_wrong_masses(monkeypatch):
    monkeypatch.setattr(optimal_transport, "SINKHORN_ITERATIONS", 2000)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match=r"Sinkhorn stopped after 2000 iterations with marginals off by .*"
                                            r"sinkhorn_reg=1e-06\); raise sinkhorn_reg or use solver='emd'"):
        OptimalTransport(solver="sinkhorn", sinkhorn_reg=1e-6).coupling(torch.randn(16, 8), None, torch.arange(0, 16, 2))


@pytest.mark.parametrize("kwargs, message", [
    ({"p": 0}, "p must be a positive number, got 0"),
    ({"source_prob": "softmax"}, "source_prob 'softmax'.*uniform, importance"),
    ({"target_prob": "x"}, "target_prob 'x'"),
    ({"target": "median"}, "target 'median'.*most_important, cluster_centroid"),
    ({"solver": "lp"}, "solver 'lp'.*emd, sinkhorn"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimalTransport(**kwargs)


def test_non_finite_features_are_refused():
    features = torch.randn(4, 3)
    features[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        OptimalTransport().coupling(features, None, torch.tensor([0, 1]))
