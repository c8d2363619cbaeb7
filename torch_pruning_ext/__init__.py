"""Intra-Fusion on top of torch-pruning: structured pruning that fuses pruned channels into kept ones.

This package is the library core (it needs torch, torch-pruning, POT and numpy). The experiment
harness of the paper's tables lives in `torch_pruning_ext.experiments` and is never imported here."""
from .bn_folding import FOLD_MODES, fold_batchnorms
from .compress import CompressionSummary, compress
from .folding import ClusterFolding
from .fusion import FUSION_RULES, UnsupportedGroup, channel_features, group_members, identity_map, transport_maps
from .groups import GroupInfo, list_groups
from .importance import CRITERIA, build_importance
from .methods import METHODS
from .optimal_transport import OptimalTransport
from .pruner import GroupResult, IntraFusionPruner, channel_origin
from .reconstruction import repair_by_reconstruction
from .sampling import SamplingReport, sample_calibration
from .serialization import load_pruned, register_builder, save_pruned
from .synthesis import SynthesisReport, synthesize_calibration

__version__ = "0.2.0"

__all__ = ["CRITERIA", "ClusterFolding", "CompressionSummary", "FOLD_MODES", "FUSION_RULES", "GroupInfo",
           "GroupResult", "IntraFusionPruner", "METHODS", "OptimalTransport", "UnsupportedGroup", "build_importance",
           "channel_features", "channel_origin", "compress", "fold_batchnorms", "group_members", "identity_map", "list_groups",
           "load_pruned", "register_builder", "repair_by_reconstruction", "sample_calibration", "SamplingReport",
           "save_pruned", "SynthesisReport",
           "synthesize_calibration", "transport_maps"]
