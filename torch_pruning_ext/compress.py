"""One call for library users: prune a whole network, merge what is removed, repair, and summarise.

compress(model, example_inputs, sparsity=0.5, method="fold", calibration=images) returns the
compressed model and a CompressionSummary (parameters and MACs before and after, channels per
layer, which groups were fused, how each layer was repaired). Nothing is printed: progress is
reported through the optional `progress(done, total)` callback.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from .checks import check_choice
from .groups import ROOT_TYPES, out_channels, output_layers
from .methods import check_method, method_plan
from .modes import eval_mode
from .pruner import IntraFusionPruner, channel_origin, check_sparsity
from .repair import (REPAIR_MODES, fused_row_maps, repair_by_reconstruction, repair_variance, repair_with_data,
                     repair_without_data)

CALIBRATION_SAMPLES = 1024  # unlabelled inputs the data repairs use by default
SCHEDULES = ("uniform", "global")


def check_schedule(schedule: str, max_layer_sparsity: float | None) -> float | None:
    """Validate a schedule and its cap (the cap only caps the global schedule); returns the cap."""
    check_choice(schedule, SCHEDULES, "schedule")
    if max_layer_sparsity is None:
        return None
    if schedule != "global":
        raise ValueError("--max-layer-sparsity caps the global schedule; add --schedule global "
                         "(in compress(): max_layer_sparsity needs schedule='global')")
    return check_sparsity(max_layer_sparsity)


@dataclass
class CompressionSummary:
    """What compress() did, in numbers (to_dict() is JSON-ready)."""
    method: str
    sparsity: float
    schedule: str
    repair: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels: dict = field(default_factory=dict)  # layer -> [out-channels before, after]
    fused_groups: int = 0
    unfused_groups: dict = field(default_factory=dict)  # group index -> why it was pruned without fusion
    repaired_layers: dict = field(default_factory=dict)  # layer -> how reconstruct refitted it

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    def to_dict(self) -> dict:
        return asdict(self) | {"params_ratio": self.params_ratio, "macs_ratio": self.macs_ratio}


def calibration_tensor(calibration, limit: int = CALIBRATION_SAMPLES) -> torch.Tensor | None:
    """Up to `limit` unlabelled inputs from a tensor, or from an iterable (e.g. a DataLoader) of
    tensors or of (inputs, labels, ...) tuples."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        taken = calibration[:limit]
    else:
        parts, count = [], 0
        for batch in calibration:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(inputs, torch.Tensor):
                raise TypeError(f"calibration batches must be tensors or (inputs, ...) tuples, got "
                                f"{type(inputs).__name__}")
            parts.append(inputs[:limit - count])
            count += len(parts[-1])
            if count >= limit:
                break
        if not parts:
            raise ValueError("calibration data is empty")
        taken = torch.cat(parts)
    if len(taken) == 0:
        raise ValueError("calibration data is empty")
    return taken


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {name: out_channels(m) for name, m in model.named_modules() if isinstance(m, ROOT_TYPES)}


def compress(model: nn.Module, example_inputs: torch.Tensor, sparsity: float = 0.5, method: str = "fold",
             calibration=None, *, repair: str | None = None, importance="l1", schedule: str = "uniform",
             max_layer_sparsity: float | None = None, fold_bn: str = "exact", ignored_layers=None,
             calibration_samples: int = CALIBRATION_SAMPLES, inplace: bool = False,
             progress=None) -> tuple[nn.Module, CompressionSummary]:
    """Prune every group of `model` at `sparsity` (fraction of channels removed per group, or overall
    with schedule="global") with `method` (default / intra_fusion / intra_fusion_fp / fold), then
    repair. repair=None picks "reconstruct" when calibration data is given, else "datafree" for
    the merging methods and "none" for default pruning. BatchNorm is folded first (fold_bn).
    importance: a data-free criterion name (l1, l2, linf, lamp, random) or a torch-pruning Importance.
    Returns (compressed model, summary); the model is a copy unless inplace=True.
    """
    check_method(method)
    sparsity = check_sparsity(sparsity)
    max_layer_sparsity = check_schedule(schedule, max_layer_sparsity)
    images = calibration_tensor(calibration, calibration_samples)
    if repair is None:
        repair = "reconstruct" if images is not None else ("none" if method == "default" else "datafree")
    check_choice(repair, REPAIR_MODES, "repair")
    if repair in ("data", "data_downstream", "reconstruct") and images is None:
        raise ValueError(f"repair {repair!r} needs calibration data (a tensor or a DataLoader of inputs)")
    with eval_mode(model), torch.no_grad():
        macs_before, params_before = tp.utils.count_ops_and_params(model, example_inputs)
        channels_before = _out_channels(model)
    unfolded = (copy.deepcopy(model) if inplace else model) if repair in ("datafree", "variance") else None
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    pruner = IntraFusionPruner(target, example_inputs, importance=importance, ignored_layers=ignored_layers,
                               fold_bn=fold_bn)
    folded = copy.deepcopy(target) if repair != "none" else None  # the reference every repair compares with
    transport, rule = method_plan(method)
    results = pruner.prune("all", sparsity, transport, fusion_rule=rule, global_pruning=schedule == "global",
                           max_group_sparsity=max_layer_sparsity, progress=progress)
    report = {}
    bn_of = {pair.layer: pair.batchnorm for pair in pruner.folded}
    if repair == "reconstruct":
        report = repair_by_reconstruction(folded, target, channel_origin(results), images,
                                          row_maps=fused_row_maps(folded, results))
    elif repair in ("data", "data_downstream"):
        changed = sorted({name for r in results for name in r.producers + r.consumers})
        outputs = {pruner.names[layer] for layer in output_layers(pruner.graph)}
        downstream = [name for name in _out_channels(target) if name not in outputs] \
            if repair == "data_downstream" else []
        repair_with_data(folded, target, changed, channel_origin(results), images, downstream=downstream)
    elif repair == "datafree":
        repair_without_data(unfolded, folded, target, results, channel_origin(results), bn_of)
    elif repair == "variance":
        repair_variance(unfolded, folded, target, results, bn_of)
    with eval_mode(target), torch.no_grad():
        macs_after, params_after = tp.utils.count_ops_and_params(target, example_inputs)
    after = _out_channels(target)
    summary = CompressionSummary(
        method, sparsity, schedule, repair, int(params_before), int(params_after), int(macs_before),
        int(macs_after), {name: [before, after.get(name, 0)] for name, before in channels_before.items()},
        sum(r.fused for r in results),
        {r.group: r.fallback_reason for r in results if r.fallback_reason}, report)
    return target.eval(), summary
