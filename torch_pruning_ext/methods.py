"""The pruning methods compared throughout: what happens to the channels that are removed."""
from __future__ import annotations

from .folding import ClusterFolding
from .optimal_transport import OptimalTransport
from .checks import check_choice

# method -> fusion rule; default pruning drops the channels, the others merge them into the kept ones
METHODS = {"default": None,                            # plain pruning (transport=None)
           "intra_fusion": "reference",                 # optimal transport, the paper's rule
           "intra_fusion_fp": "function_preserving",    # optimal transport, average producers / sum consumers
           "fold": "function_preserving"}               # Model Folding: k-means clusters, same merge


def check_method(method: str) -> None:
    check_choice(method, METHODS, "method")


def method_plan(method: str, transport: OptimalTransport | None = None, seed: int = 0):
    """(transport, fusion_rule) to pass to IntraFusionPruner.prune for `method`; `transport` is the
    optimal transport used by the Intra-Fusion methods (default: the paper's)."""
    check_method(method)
    if method == "default":
        return None, "reference"
    if method == "fold":
        return ClusterFolding(seed=seed), METHODS[method]
    return transport or OptimalTransport(), METHODS[method]
