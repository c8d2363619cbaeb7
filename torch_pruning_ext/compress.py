"""One call for library users: prune a whole network, merge what is removed, repair, and summarise.

compress(model, example_inputs, sparsity=0.5, method="fold", calibration=images) returns the
compressed model and a CompressionSummary (parameters and MACs before and after, channels per
layer, which groups were fused, how each layer was repaired). Nothing is printed: progress is
reported through the optional `progress(done, total)` callback.
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from .checks import check_choice
from .groups import ROOT_TYPES, out_channels, output_layers
from .methods import check_method, method_plan
from .modes import eval_mode
from .pruner import IntraFusionPruner, check_sparsity
from .importance import build_importance, needs_data
from .inputs import (batch_length, concatenate, first_line, map_tensors, run_model, shape_text, take,
                     tensors_of)
from .sampling import SAMPLED_SEQUENCES, sample_calibration, token_ids
from .synthesis import SYNTHETIC_SAMPLES, has_batchnorm, synthesize_calibration
from .reconstruction import RECONSTRUCT_COST, check_reconstruct_options
from .repair import DATA_MODES, REPAIR_MODES, RepairJob, apply_repair, batchnorm_sources

CALIBRATION_SAMPLES = 1024  # unlabelled inputs the data repairs use by default
IMPORTANCE_SAMPLES = 64  # inputs per backward pass of the data-driven criteria
SCHEDULES = ("uniform", "global")


def check_schedule(schedule: str, max_layer_sparsity: float | None) -> float | None:
    """Validate a schedule and its cap (the cap only caps the global schedule); returns the cap."""
    check_choice(schedule, SCHEDULES, "schedule")
    if max_layer_sparsity is None:
        return None
    if schedule != "global":
        raise ValueError(f"max_layer_sparsity={max_layer_sparsity} caps the global schedule only; the schedule "
                         f"is {schedule!r}: pass schedule='global'")
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
    skipped_groups: dict = field(default_factory=dict)  # root layer -> why its group was left unpruned
    size_attributes: dict = field(default_factory=dict)  # "module.attribute" -> [old, new] widths updated
    synthesis: dict | None = None  # how the calibration inputs were synthesised (calibration="synthetic")

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    def to_dict(self) -> dict:
        return asdict(self) | {"params_ratio": self.params_ratio, "macs_ratio": self.macs_ratio}


def calibration_batches(calibration, limit: int = CALIBRATION_SAMPLES) -> list[tuple]:
    """Up to `limit` samples as (inputs, labels or None) batches, from a tensor or a dict of tensors
    (keyword inputs such as token ids and an attention mask), or from an iterable (e.g. a DataLoader)
    of tensors, of dicts, or of (inputs, labels, ...) tuples."""
    if isinstance(calibration, (torch.Tensor, dict)):
        batches = [(take(calibration, slice(0, limit)), None)]
    else:
        if isinstance(calibration, (str, bytes)) or not hasattr(calibration, "__iter__"):
            raise TypeError("calibration must be a tensor, a dict of tensors or an iterable of batches, got "
                            f"{type(calibration).__name__}")
        batches, count = [], 0
        for batch in calibration:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
            if not isinstance(inputs, (torch.Tensor, dict)) or not tensors_of(inputs):
                raise TypeError(f"calibration batches must be tensors, dicts of tensors or (inputs, ...) tuples, got "
                                f"{type(inputs).__name__}")
            take_count = limit - count
            batches.append((take(inputs, slice(0, take_count)),
                            labels[:take_count] if isinstance(labels, torch.Tensor) else None))
            count += batch_length(batches[-1][0])
            if count >= limit:
                break
    if sum(batch_length(inputs) for inputs, _ in batches) == 0:
        raise ValueError("calibration data is empty")
    return batches


def _check_inputs(model: nn.Module, inputs, what: str, example: torch.Tensor | None = None) -> None:
    """Refuse, in one line naming `what`, inputs the original model cannot use: non-finite values,
    another device, an integer tensor where the model takes floats, or anything it fails to run
    (tried on the first two samples of a tensor that comes with an example)."""
    tensors = tensors_of(inputs)
    parameter = next(model.parameters(), None)
    for tensor in tensors:
        if parameter is not None and tensor.device != parameter.device:
            raise ValueError(f"{what} is on {tensor.device}, the model on {parameter.device}; move one of them")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).flatten(1).any(1).nonzero()[0]) if tensor.dim() > 1 else 0
            raise ValueError(f"{what} contains NaN or inf values (first in sample {bad})")
    if example is not None and isinstance(inputs, torch.Tensor) and example.is_floating_point() \
            and not inputs.is_floating_point():
        raise ValueError(f"{what} has dtype {inputs.dtype}, the example inputs {example.dtype}")
    trial = take(inputs, slice(0, 2)) if example is not None else inputs
    try:
        with eval_mode(model), torch.no_grad():
            run_model(model, trial)
    except Exception as error:  # noqa: BLE001 - whatever the user's forward raises is the finding
        raise ValueError(f"{what}: the model does not run on inputs shaped {shape_text(inputs)}: "
                         f"{first_line(error)}") from None


def _concatenated(batches):
    """The calibration batches as one batch; their samples must have one shape (per tensor of a dict)."""
    shapes = {shape_text(map_tensors(inputs, lambda t: t[0] if t.dim() else t)) for inputs, _ in batches}
    if len(shapes) > 1:
        raise ValueError(f"calibration batches hold samples of different shapes: {', '.join(sorted(shapes))}")
    return concatenate([inputs for inputs, _ in batches])


def _check_finite_outputs(model: nn.Module, inputs, stage: str) -> None:
    with eval_mode(model), torch.no_grad():
        outputs = tensors_of(run_model(model, inputs))
    if not all(torch.isfinite(t).all() for t in outputs if t.is_floating_point()):
        raise RuntimeError(f"the model gives non-finite outputs after {stage}; nothing was returned")


def _labelled(model: nn.Module, batches, chunk: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches for the data-driven criteria: the labels given, else the original
    model's own predictions (argmax of its first output), so no labels are needed."""
    labelled = []
    for inputs, labels in batches:
        for start in range(0, batch_length(inputs), chunk):
            part = take(inputs, slice(start, start + chunk))
            if labels is None:
                with eval_mode(model), torch.no_grad():
                    predicted = tensors_of(run_model(model, part))[0].argmax(dim=-1)
            labelled.append((part, labels[start:start + chunk] if labels is not None else predicted))
    return labelled


def _count(model: nn.Module, example_inputs) -> tuple:
    """(MACs, parameters) by torch-pruning's counter, whose notes on keyword-only inputs go nowhere:
    library code does not print."""
    with contextlib.redirect_stdout(io.StringIO()):
        return tp.utils.count_ops_and_params(model, example_inputs)


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {name: out_channels(m) for name, m in model.named_modules() if isinstance(m, ROOT_TYPES)}


def compress(model: nn.Module, example_inputs, sparsity: float = 0.5, method: str = "fold",
             calibration=None, *, repair: str | None = None, importance="l1", schedule: str = "uniform",
             head_sparsity: float | None = None, loss=None,
             max_layer_sparsity: float | None = None, fold_bn: str = "exact", ignored_layers=None,
             prune_output_layers: bool = False, calibration_samples: int | None = None,
             batch_size: int | None = None, memory_budget: int | None = None,
             reconstruct_cost: float = RECONSTRUCT_COST,
             inplace: bool = False, progress=None) -> tuple[nn.Module, CompressionSummary]:
    """Prune every group of `model` at `sparsity` (fraction of channels removed per group, or overall
    with schedule="global") with `method` (default / intra_fusion / intra_fusion_fp / fold), then
    repair. example_inputs: a tensor, or a dict of tensors for a model called with keywords (token
    ids and an attention mask). Attention blocks lose `head_sparsity` of their heads (default:
    `sparsity`; 0 keeps them): whole heads, ranked by what they add to the output projection on 64
    calibration inputs (by weight magnitude without calibration), pruned and never merged unless
    identical to a kept head (attention.py). repair=None picks "reconstruct" when calibration data is
    given, else "datafree" for the merging methods and "none" for default pruning. BatchNorm is folded
    first (fold_bn).
    importance: a criterion name (importance.CRITERIA) or a torch-pruning Importance; the data-driven
    ones (taylor, chip, taylor_fm, thinet) are measured on the calibration data, with its labels when
    its batches carry them, else with the original model's own predictions as labels; `loss(outputs,
    inputs, labels)` replaces the cross-entropy the gradient criteria (taylor, taylor_fm) back-propagate.
    ignored_layers: modules of `model`, module names or module types never pruned; the layers feeding
    the outputs are protected too unless prune_output_layers=True. Groups whose pruning would break
    the model (a width forward() reads from an attribute that cannot be updated, a permute before a
    flatten) are left unpruned and listed in summary.skipped_groups, with a warning.
    Inputs the model cannot run are refused before any work; a model with non-finite outputs is
    never returned. calibration="synthetic" uses no data: calibration_samples (default 256) inputs
    are synthesised from the model's BatchNorm statistics (synthesize_calibration), or, for a language
    model called with token ids and without BatchNorm, sampled from the model itself
    (sample_calibration); summary.synthesis says how. Real calibration uses up to calibration_samples
    (default 1024) inputs.
    The reconstruction runs the calibration inputs through both models once, in chunks of batch_size
    (None: 384; activation memory is set by the chunk); a layer whose Gram matrices would exceed
    memory_budget bytes, or whose output-space fit would cost more than reconstruct_cost x its share of
    a forward pass (float("inf"): no bound), gets the cheaper input-space fit.
    Returns (compressed model, summary); the model is a copy unless inplace=True.
    """
    check_method(method)
    sparsity = check_sparsity(sparsity)
    head_sparsity = sparsity if head_sparsity is None else check_sparsity(head_sparsity, "head_sparsity")
    max_layer_sparsity = check_schedule(schedule, max_layer_sparsity)
    if repair is not None:
        check_choice(repair, REPAIR_MODES, "repair")
    check_reconstruct_options(batch_size, memory_budget, reconstruct_cost)
    criterion = build_importance(importance, loss=loss)
    _check_inputs(model, example_inputs, "example_inputs")
    synthesis = None
    if isinstance(calibration, str):
        check_choice(calibration, ("synthetic",), "calibration", also="a tensor, an iterable of batches or None")
        language_model = token_ids(example_inputs) is not None and not has_batchnorm(model)
        calibration, synthesis = (sample_calibration(model, example_inputs, calibration_samples or SAMPLED_SEQUENCES)
                                  if language_model else
                                  synthesize_calibration(model, example_inputs, calibration_samples or SYNTHETIC_SAMPLES))
    samples = calibration_samples or CALIBRATION_SAMPLES
    batches = calibration_batches(calibration, samples) if calibration is not None else None
    images = _concatenated(batches) if batches else None
    if images is not None:
        check_reconstruct_options(batch_size, samples=batch_length(images))
        _check_inputs(model, images, "calibration", example_inputs)
    if repair is None:
        repair = "reconstruct" if images is not None else ("none" if method == "default" else "datafree")
    if repair in DATA_MODES and images is None:
        raise ValueError(f"repair {repair!r} needs calibration data (a tensor or a DataLoader of inputs)")
    if needs_data(criterion) and images is None:
        raise ValueError(f"importance {importance!r} is measured on data: pass calibration (inputs, or "
                         "(inputs, labels) batches; without labels the model's own predictions are used)")
    importance_batches = _labelled(model, batches, IMPORTANCE_SAMPLES) if needs_data(criterion) else None
    with eval_mode(model), torch.no_grad():
        macs_before, params_before = _count(model, example_inputs)
        channels_before = _out_channels(model)
    unfolded = (copy.deepcopy(model) if inplace else model) if repair in ("datafree", "variance") else None
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    pruner = IntraFusionPruner(target, example_inputs, importance=criterion, ignored_layers=ignored_layers,
                               fold_bn=fold_bn, calibration_batches=importance_batches,
                               prune_output_layers=prune_output_layers, source_model=None if inplace else model,
                               head_inputs=take(images, slice(0, IMPORTANCE_SAMPLES)) if images is not None else None)
    folded = copy.deepcopy(target) if repair != "none" else None  # the reference every repair compares with
    transport, rule = method_plan(method)
    results = pruner.prune("all", sparsity, transport, fusion_rule=rule, global_pruning=schedule == "global",
                           max_group_sparsity=max_layer_sparsity, head_sparsity=head_sparsity, progress=progress)
    bn_of, after_relu = batchnorm_sources(pruner.folded)
    outputs = frozenset(pruner.names[layer] for layer in output_layers(pruner.graph))
    report = apply_repair(repair, RepairJob(unfolded, folded, target, results, bn_of, after_relu, images,
                                            protected=outputs, batch_size=batch_size, memory_budget=memory_budget,
                                            cost=reconstruct_cost))
    _check_finite_outputs(target, example_inputs, f"pruning and the {repair!r} repair")
    with eval_mode(target), torch.no_grad():
        macs_after, params_after = _count(target, example_inputs)
    after = _out_channels(target)
    summary = CompressionSummary(
        method, sparsity, schedule, repair, int(params_before), int(params_after), int(macs_before),
        int(macs_after), {name: [before, after.get(name, 0)] for name, before in channels_before.items()},
        sum(r.fused for r in results),
        {r.group: r.fallback_reason for r in results if r.fallback_reason}, report,
        {pruner.root_name(r.group): r.skipped_reason for r in results if r.skipped_reason},
        dict(pruner.size_attributes), asdict(synthesis) if synthesis is not None else None)
    return target.eval(), summary
