"""The optimal-transport coupling between a group's channels and the channels that stay.

Intra-Fusion moves every channel's mass (pruned ones included) onto the k remaining channels along
the cheapest plan, so the information of pruned channels is merged instead of dropped.
"""
from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ot
import torch

from .checks import check_choice
from .l1_kernel import l1_distances, l1_kernel

PROBABILITIES = ("uniform", "importance")
TARGETS = ("most_important", "cluster_centroid")
SOLVERS = ("emd", "sinkhorn")
SINKHORN_ITERATIONS = 20000
SINKHORN_MARGINAL_TOLERANCE = 1e-3  # relative error of the plan's row/column sums that gets a warning
# p=1 costs with at least this many |a - b| terms (n * k * d) go through the compiled kernel (l1_kernel.py)
COMPILED_L1_MIN_TERMS = 1 << 22


def _marginal(weights: np.ndarray | None, size: int) -> np.ndarray:
    """A float64 probability vector; uniform when the weights are absent, all zero or not finite."""
    if weights is not None:
        weights = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
        total = weights.sum()
        if np.isfinite(total) and total > 0:
            return weights / total
    return np.full(size, 1.0 / size, dtype=np.float64)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def _unit_rows_float32(vectors: np.ndarray, block: int = 256) -> torch.Tensor:
    """torch.from_numpy(_unit_rows(vectors)).float(), bit for bit, made block by block of rows in
    parallel (no float64 copy of the whole matrix) where the rows are contiguous: numpy then sums each
    row's squares along the contiguous axis, a pairwise sum that depends on that row alone."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if not vectors.flags.c_contiguous or vectors.ndim != 2:
        return torch.from_numpy(_unit_rows(vectors)).float()
    out = np.empty(vectors.shape, dtype=np.float32)

    def run(start: int) -> None:
        out[start:start + block] = _unit_rows(vectors[start:start + block])

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:  # numpy releases the GIL
        list(pool.map(run, range(0, len(vectors), block)))
    return torch.from_numpy(out)


class OptimalTransport:
    """Computes the coupling G (n x k) between all n channels and the k targets.

    p: order of the p-norm distance used as transport cost (p=1 in the paper).
    source_prob / target_prob: "uniform" or "importance" (mass proportional to importance).
    target: "most_important" (the kept channels) or "cluster_centroid" (k spherical GMM means).
    solver: "emd" (exact, as in the paper) or "sinkhorn" (entropic, for very large groups).
    """

    def __init__(self, p: float = 1, source_prob: str = "uniform", target_prob: str = "uniform",
                 target: str = "most_important", solver: str = "emd", sinkhorn_reg: float = 0.01):
        if not (isinstance(p, (int, float)) and p > 0):
            raise ValueError(f"p must be a positive number, got {p!r}")
        check_choice(source_prob, PROBABILITIES, "source_prob")
        check_choice(target_prob, PROBABILITIES, "target_prob")
        check_choice(target, TARGETS, "target")
        check_choice(solver, SOLVERS, "solver")
        if not sinkhorn_reg > 0:
            raise ValueError(f"sinkhorn_reg must be positive, got {sinkhorn_reg!r}")
        self.p, self.source_prob, self.target_prob = p, source_prob, target_prob
        self.target, self.solver, self.sinkhorn_reg = target, solver, sinkhorn_reg
        self.last_solve_seconds = 0.0  # time of the last solver call alone (benchmarks read it)
        self.last_cost_seconds = 0.0  # time of the last cost matrix alone

    def __repr__(self) -> str:
        return (f"OptimalTransport(p={self.p}, source_prob={self.source_prob!r}, target_prob="
                f"{self.target_prob!r}, target={self.target!r}, solver={self.solver!r})")

    def targets(self, features: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Target vectors (k x d) and, for cluster centroids, each channel's cluster label."""
        if self.target == "most_important":
            return features[kept], np.full(len(features), -1)
        try:
            from sklearn.mixture import GaussianMixture
        except ImportError:
            raise ImportError("target='cluster_centroid' fits a Gaussian mixture with scikit-learn, which is not "
                              "installed: pip install scikit-learn") from None
        mixture = GaussianMixture(n_components=len(kept), covariance_type="spherical", random_state=0)
        labels = mixture.fit(features).predict(features)
        return mixture.means_, labels

    def cost(self, vectors: np.ndarray, target_vectors: np.ndarray, kept: np.ndarray | None = None) -> np.ndarray:
        """The transport cost (float64, n x k): p-norm distances between the unit-norm rows, computed in
        float32 (several times faster than float64 and far finer than weight noise). `kept`: indices
        with target_vectors == vectors[kept] (target="most_important"); the p=1 kernel then computes the
        symmetric kept x kept block once."""
        vectors = np.asarray(vectors, dtype=np.float64)
        n, k, d = len(vectors), len(target_vectors), vectors.shape[1]
        if self.p != 1 or n * k * d < COMPILED_L1_MIN_TERMS or l1_kernel() is None:
            return torch.cdist(_unit_rows_float32(vectors), _unit_rows_float32(target_vectors),
                               p=float(self.p)).double().numpy()
        sources = _unit_rows_float32(vectors).numpy()
        if kept is not None and vectors.flags.c_contiguous and len(np.unique(kept)) == k:
            # numpy's row norms along the contiguous axis depend on the row alone, so the targets'
            # unit rows are sources[kept], bit for bit
            return l1_distances(sources, kept=np.asarray(kept, dtype=np.int64)).astype(np.float64)
        return l1_distances(sources, _unit_rows_float32(target_vectors).numpy()).astype(np.float64)

    def coupling(self, features: torch.Tensor, importance: torch.Tensor | None,
                 kept: torch.Tensor) -> torch.Tensor:
        """Return G (float64, n x k): G[i, j] is the mass moved from channel i to target j."""
        vectors = features.detach().double().cpu().numpy()
        kept_np = np.asarray(kept.cpu(), dtype=np.int64)
        n, k = len(vectors), len(kept_np)
        if not np.all(np.isfinite(vectors)):
            raise ValueError("channel feature vectors contain NaN or inf; check the model's weights")
        scores = None if importance is None else importance.detach().double().cpu().numpy()
        target_vectors, labels = self.targets(vectors, kept_np)
        source = _marginal(scores if self.source_prob == "importance" else None, n)
        if self.target_prob == "importance" and scores is not None:
            if self.target == "most_important":
                target_scores = scores[kept_np]
            else:
                target_scores = np.array([scores[labels == j].sum() for j in range(k)])
            target_mass = _marginal(target_scores, k)
        else:
            target_mass = _marginal(None, k)
        started = time.perf_counter()
        cost = self.cost(vectors, target_vectors, kept_np if self.target == "most_important" else None)
        self.last_cost_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if self.solver == "emd":
            plan = ot.emd(source, target_mass, cost, numItermax=max(100_000, 50 * n * k))
        else:
            scaled = cost / cost.max() if cost.max() > 0 else cost
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
                plan = ot.sinkhorn(source, target_mass, scaled, self.sinkhorn_reg, method="sinkhorn_log",
                                   numItermax=SINKHORN_ITERATIONS, stopThr=1e-9)
            _warn_if_marginals_off(np.asarray(plan), source, target_mass, self.sinkhorn_reg)
        self.last_solve_seconds = time.perf_counter() - started
        return torch.from_numpy(np.asarray(plan, dtype=np.float64))


def _warn_if_marginals_off(plan: np.ndarray, source: np.ndarray, target: np.ndarray, reg: float) -> None:
    """POT stops Sinkhorn at its iteration cap with a generic warning; say instead how far the plan
    is from moving the right masses, and only when that matters."""
    error = max(np.abs(plan.sum(1) - source).max() / source.max(), np.abs(plan.sum(0) - target).max() / target.max())
    if error > SINKHORN_MARGINAL_TOLERANCE:
        warnings.warn(f"Sinkhorn stopped after {SINKHORN_ITERATIONS} iterations with marginals off by "
                      f"{100 * error:.2g}% (sinkhorn_reg={reg:g}); raise sinkhorn_reg or use solver='emd'",
                      RuntimeWarning, stacklevel=3)
