"""Model Folding (Wang et al., ICLR 2025) as a coupling: the data-free baseline beside Intra-Fusion.

Each group's channels are clustered by k-means on their producer weight rows (BatchNorm folded
first); each cluster becomes one channel whose producer row is the cluster's average and whose
consumer column is the cluster's sum. Written as a hard coupling (channel i sends all its mass to
its cluster's slot) and fused with the function-preserving rule, that is exactly this merge, so
it runs through the same pruner, fusion and slicing as Intra-Fusion.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def kmeans(points: torch.Tensor, k: int, iterations: int = 100, seed: int = 0) -> torch.Tensor:
    """Cluster labels (n,) of Lloyd's k-means with k-means++ seeding; no cluster is left empty."""
    points = points.double()
    n = len(points)
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = ((points - points[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        weights = nearest.clone()
        weights[chosen] = 0
        if weights.sum() <= 0:  # every remaining point coincides with a centre: take any unchosen one
            weights = torch.ones(n, dtype=torch.float64)
            weights[chosen] = 0
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, ((points - points[chosen[-1]]) ** 2).sum(1))
    centres = points[chosen].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        distances = torch.cdist(points, centres)
        new_labels = distances.argmin(1)
        counts = torch.bincount(new_labels, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():  # re-seed with the worst-served point
            worst = int(distances.gather(1, new_labels[:, None]).flatten().argmax())
            new_labels[worst] = empty
            distances[worst] = 0
            counts = torch.bincount(new_labels, minlength=k)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        centres = torch.zeros_like(centres).index_add_(0, labels, points) / counts[:, None].double()
    return labels


class ClusterFolding:
    """coupling(features, importance, kept) like OptimalTransport, from k-means clusters.

    The k clusters are matched one to one to the k kept channels (a kept channel inside a cluster
    is preferred as its slot, so a slot's channel index still names a channel of its cluster).
    Only producer rows describe a channel here (feature_roles), as in Model Folding.
    """

    feature_roles = ("producer",)

    def __init__(self, iterations: int = 100, seed: int = 0):
        if not (isinstance(iterations, int) and iterations > 0):
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        self.iterations, self.seed = iterations, seed
        self.last_solve_seconds = 0.0

    def __repr__(self) -> str:
        return f"ClusterFolding(iterations={self.iterations}, seed={self.seed})"

    def coupling(self, features: torch.Tensor, importance, kept: torch.Tensor) -> torch.Tensor:
        points = features.detach().double().cpu()
        if not torch.isfinite(points).all():
            raise ValueError("channel feature vectors contain NaN or inf; check the model's weights")
        n, k = len(points), len(kept)
        labels = kmeans(points, k, self.iterations, self.seed)
        centres = torch.zeros(k, points.shape[1], dtype=torch.float64).index_add_(0, labels, points)
        centres /= torch.bincount(labels, minlength=k)[:, None].double()
        cost = torch.cdist(centres, points[kept])
        cost -= (cost.max() + 1) * (labels[kept][None, :] == torch.arange(k)[:, None]).double()
        clusters, slots = linear_sum_assignment(cost.numpy())
        slot_of = np.empty(k, dtype=np.int64)
        slot_of[clusters] = slots
        plan = torch.zeros(n, k, dtype=torch.float64)
        plan[torch.arange(n), torch.from_numpy(slot_of)[labels]] = 1.0 / n
        return plan
