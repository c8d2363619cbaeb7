"""Intra-Fusion on top of torch-pruning: structured pruning that fuses pruned channels into kept ones."""
from .bn_folding import FOLD_MODES, fold_batchnorms
from .compress import CompressionSummary, compress
from .folding import ClusterFolding
from .fusion import FUSION_RULES, channel_features, group_members, identity_map, transport_maps
from .groups import GroupInfo, list_groups
from .importance import CRITERIA, build_importance
from .methods import METHODS
from .optimal_transport import OptimalTransport
from .pruner import GroupResult, IntraFusionPruner
from .repair import repair_by_reconstruction
from .serialization import load_pruned, save_pruned

__all__ = ["CRITERIA", "ClusterFolding", "CompressionSummary", "METHODS", "compress", "repair_by_reconstruction", "FOLD_MODES", "FUSION_RULES", "GroupInfo", "GroupResult", "IntraFusionPruner",
           "OptimalTransport", "build_importance", "channel_features", "fold_batchnorms", "group_members",
           "identity_map", "list_groups", "load_pruned", "save_pruned", "transport_maps"]
