import sys
import warnings

import numpy as np
import pytest
import torch

from torch_pruning_ext import OptimalTransport, identity_map, optimal_transport, transport_maps
from torch_pruning_ext import l1_kernel as kernel


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


@pytest.mark.slow
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


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


@pytest.fixture
def l1_kernel():
    if kernel.l1_kernel() is None:
        pytest.skip("no C compiler here: the p=1 cost falls back to torch.cdist")


@pytest.mark.parametrize("n, k, d, block", [(37, 19, 301, 512), (130, 130, 700, 128), (65, 33, 1030, 256),
                                            (5, 3, 2, 512), (1, 1, 9, 4)])
def test_l1_kernel_gives_the_distances_of_torch_cdist_bitwise(l1_kernel, n, k, d, block):
    # torch.cdist(p=1) on the CPU sums in float32 coordinate after coordinate; the kernel makes the same
    # sums in the same order, so equality is exact, not to rounding (the EMD plan then cannot change)
    generator = torch.Generator().manual_seed(n * d)
    rows = _unit(torch.randn(n, d, generator=generator))
    for kept in (torch.arange(k), torch.randperm(n, generator=generator)[:k]):
        expected = torch.cdist(rows, rows[kept], p=1.0).numpy()
        got = optimal_transport.l1_distances(rows.numpy(), kept=kept.numpy(), _block=block)  # symmetric block once
        assert got.dtype == np.float32 and np.array_equal(got, expected)
        assert np.array_equal(optimal_transport.l1_distances(rows.numpy(), rows[kept].numpy(), _block=block), expected)
    others = _unit(torch.randn(k + 3, d, generator=generator))  # targets that are not sources
    got = optimal_transport.l1_distances(rows.numpy(), others.numpy(), _block=block)
    assert np.array_equal(got, torch.cdist(rows, others, p=1.0).numpy())
    assert np.allclose(got, torch.cdist(rows.double(), others.double(), p=1.0).numpy(), rtol=1e-5, atol=0)


def test_unit_rows_in_float32_block_by_block_are_the_whole_matrix_ones():
    generator = torch.Generator().manual_seed(0)
    for n, d in [(1, 1), (7, 3), (300, 9), (513, 1000)]:
        vectors = torch.randn(n, d, generator=generator, dtype=torch.float64).numpy()
        vectors[n // 2] = 0
        expected = torch.from_numpy(optimal_transport._unit_rows(vectors)).float()
        for layout in (vectors, np.asfortranarray(vectors)):
            assert torch.equal(optimal_transport._unit_rows_float32(layout, block=64), expected)
        assert torch.equal(optimal_transport._unit_rows_float32(vectors[::2]),
                           torch.from_numpy(optimal_transport._unit_rows(vectors[::2])).float())


@pytest.mark.parametrize("seed", range(4))
def test_the_p1_kernel_leaves_the_cost_and_the_plan_unchanged(l1_kernel, monkeypatch, seed):
    generator = torch.Generator().manual_seed(seed)
    features, importance = torch.randn(96, 300, generator=generator), torch.rand(96, generator=generator)
    kept = torch.randperm(96, generator=generator)[:48]  # any order: rows of the plan follow kept
    transports = [OptimalTransport(), OptimalTransport(source_prob="importance", target_prob="importance")]
    vectors = features.double().numpy()
    monkeypatch.setattr(optimal_transport, "COMPILED_L1_MIN_TERMS", 0)
    new_cost = transports[0].cost(vectors, vectors[kept.numpy()], kept.numpy())
    new = [transport.coupling(features, importance, kept) for transport in transports]
    monkeypatch.setattr(kernel, "_l1_function", False)  # what the code did before: torch.cdist
    old_cost = transports[0].cost(vectors, vectors[kept.numpy()], kept.numpy())
    old = [transport.coupling(features, importance, kept) for transport in transports]
    assert np.array_equal(new_cost, old_cost)
    for before, after in zip(old, new):
        assert torch.equal(before, after)


def test_cluster_centroids_without_scikit_learn_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.mixture", None)  # as if scikit-learn were not installed
    with pytest.raises(ImportError, match="target='cluster_centroid' fits a Gaussian mixture with scikit-learn"):
        OptimalTransport(target="cluster_centroid").coupling(torch.randn(6, 4), None, torch.tensor([0, 1]))
