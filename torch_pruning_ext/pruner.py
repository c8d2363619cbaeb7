"""Prune numbered groups one after another, with default pruning or Intra-Fusion.

Each group's importance is computed after the previous groups were fused and pruned (as the released
code does), so pruning several groups in one call equals pruning them in sequence.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .bn_folding import FOLD_MODES, FoldedPair, fold_batchnorms
from .conv_blocks import block_coupling, block_pruned, channel_blocks
from .fusion import (UnsupportedGroup, channel_features, fuse_members, group_members, layer_roles,
                     prune_channels, transport_maps, uneven_member, zero_channels, FUSION_RULES)
from .attention import check_heads, find_attention, head_grams, merge_twin_heads, prune_heads, removal_order, zero_heads
from .groups import (GroupInfo, attention_layers, describe_groups, describe_heads, full_group, numbered_roots,
                     out_channels, protected_layers, trace_graph)
from .importance import build_importance, needs_data
from .optimal_transport import OptimalTransport
from .standard_layers import replace_transposed_linears, retie, tied_parameters
from .safety import (breaking_groups, check_outputs, layer_widths, probe_mapping, record_forward, sync_attributes,
                     touches_attributes)
from .checks import check_choice


@dataclass
class GroupResult:
    """What happened to one group: which channels went, whether they were fused, and timings."""
    group: int
    channels: int
    pruned: list[int]
    fused: bool
    fallback_reason: str | None = None
    seconds: dict = field(default_factory=dict)
    producers: list[str] = field(default_factory=list)  # layers whose out-channels were pruned/fused
    consumers: list[str] = field(default_factory=list)  # layers whose in-channels were pruned/fused
    producer_map: torch.Tensor | None = None  # k x n map applied to the producers' rows, if fused
    skipped_reason: str | None = None  # why the group was left unpruned (pruning it would break the model)
    # producer name -> original index of each of its out-channels after this group (what repair needs)
    origins: dict[str, torch.Tensor] = field(default_factory=dict)


def channel_origin(results: list[GroupResult]) -> dict[str, torch.Tensor]:
    """Layer name -> original index of each current out-channel, for every layer that lost channels
    in `results` (pruned in that order): the repairs' view of what each kept channel stands for."""
    merged = {}
    for result in results:
        merged.update(result.origins)
    return merged


def kept_count(channels: int, sparsity: float) -> int:
    """k = int(n * (1 - s)) as in the released code, but never fewer than one channel."""
    return max(1, int(channels * (1 - sparsity)))


def kept_heads(units: int, sparsity: float) -> int:
    """Heads (or key-value groups) kept: the nearest whole number to units * (1 - s), at least one.
    A block has few heads, and flooring as for channels would remove 2 of 4 heads at s=0.3."""
    return max(1, round(units * (1 - sparsity)))


def check_sparsity(sparsity, what: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) \
            or not 0 <= sparsity < 1:
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


class IntraFusionPruner:
    """Structured pruning of numbered groups, optionally fusing pruned channels by optimal transport.

    model: pruned in place (GPT-2-style Conv1D layers are replaced by equal nn.Linear layers first).
    example_inputs: a batch used to trace the dependency graph (a tensor, or a dict of keyword inputs).
    importance: criterion name (see importance.CRITERIA) or a torch-pruning Importance.
    ignored_layers: layers whose out-channels are never pruned: modules (of `model`, or of
    `source_model` when `model` is a copy of it), module names or module types. The layers feeding the
    model's outputs are never pruned either, unless prune_output_layers=True.
    fold_bn: None (default: the model's BatchNorms are left as they are; unfolded ones are fused
    along the transport map) or "exact" / "reference" to fold them into the preceding layers first,
    as the paper does (the same as calling fold_batchnorms before).
    calibration_batches: (inputs, labels) batches for the data-driven criteria (importance.DATA_CRITERIA:
    taylor, chip, taylor_fm, thinet).
    score_cache: a dict shared by pruners of identical copies of one model (same criterion and
    batches): the data-driven criteria's scores of groups measured before the model changes are
    kept there by group index and reused, so each costs one pass over the batches, not one per copy.
    head_inputs: unlabelled inputs on which attention heads are ranked by what they add to the output
    projection (attention.removal_order); None ranks them by weight magnitude.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, importance="l1",
                 ignored_layers=None, fold_bn: str | None = None, calibration_batches=None,
                 score_cache: dict | None = None, prune_output_layers: bool = False,
                 source_model: nn.Module | None = None, head_inputs=None):
        if fold_bn is not None:
            check_choice(fold_bn, FOLD_MODES, "fold_bn", also="or None")
        self.model = model
        self.example_inputs = example_inputs
        self.prune_output_layers = prune_output_layers
        self.importance = build_importance(importance)
        if needs_data(self.importance) and not calibration_batches:
            raise ValueError(f"importance {importance!r} needs calibration_batches (inputs, labels)")
        self.calibration_batches = calibration_batches or []
        self.head_inputs = head_inputs
        self.score_cache = score_cache if needs_data(self.importance) else None
        self.changed = False  # whether a group was pruned: cached scores no longer describe the model
        replace_transposed_linears(model)  # GPT-2's Conv1D layers become nn.Linear
        self.graph = trace_graph(model, example_inputs)
        self.folded: list[FoldedPair] = (fold_batchnorms(model, example_inputs, fold_bn, graph=self.graph)
                                         if fold_bn else [])
        protected = protected_layers(model, self.graph, ignored_layers, prune_output_layers, source_model)
        # attention blocks whose heads are pruned as units: numbered after the channel groups
        self.attention = find_attention(model, set(protected))
        self.roots = numbered_roots(model, self.graph, protected, attention_layers(model, self.attention))
        self.names = {module: name for name, module in model.named_modules()}
        # bare parameters (e.g. a layer_scale) are group members too: name them, never print them
        self.names.update({param: name for name, param in model.named_parameters()})
        # layer name -> original index of each current out-channel, for layers that lost channels
        self.channel_origin: dict[str, torch.Tensor] = {}
        # "module.attribute" -> (old, new) for the integer attributes forward() reads that pruning updated
        self.size_attributes: dict[str, tuple[int, int]] = {}

    @property
    def num_groups(self) -> int:
        return len(self.roots) + len(self.attention)

    def groups(self) -> list[GroupInfo]:
        return describe_groups(self.model, self.graph, self.roots) + describe_heads(self.attention, len(self.roots))

    def root_name(self, index: int) -> str:
        """The root layer of a channel group, or the attention block of a head group."""
        return self.names[self.roots[index]] if index < len(self.roots) else self.attention[index - len(self.roots)].name

    def _check_indices(self, group_indices) -> list[int]:
        if group_indices == "all" or group_indices is None:
            return list(range(self.num_groups))
        indices = [group_indices] if isinstance(group_indices, int) else list(group_indices)
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_groups:
                raise ValueError(f"group index {index!r} is not in the model: valid indices are "
                                 f"0..{self.num_groups - 1}")
        return indices

    def _scores(self, index: int, group=None) -> torch.Tensor:
        cacheable = self.score_cache is not None and not self.changed
        if cacheable and index in self.score_cache:
            return self.score_cache[index].clone()
        if group is None:
            group = full_group(self.graph, self.roots[index])
        with torch.enable_grad():  # the data-driven criteria back-propagate, even when called under no_grad
            if callable(getattr(self.importance, "prepare", None)):
                self.importance.prepare(self.model, group, self.calibration_batches)
            scores = self.importance(group)
        if scores is None:
            raise ValueError(f"importance {type(self.importance).__name__} gave no score for group rooted at "
                             f"{self.names.get(group[0].dep.target.module)}")
        scores = scores.detach().float().cpu()
        if cacheable:
            self.score_cache[index] = scores.clone()
        return scores

    def prune(self, group_indices="all", sparsity: float = 0.5, transport: OptimalTransport | None = None,
              fusion_rule: str = "reference", dimensionality_preserving: bool = False,
              global_pruning: bool = False, max_group_sparsity: float | None = None,
              head_sparsity: float | None = None, progress=None) -> list[GroupResult]:
        """Prune the selected groups at `sparsity`: the head groups first (`head_sparsity` of each
        attention block's heads, default `sparsity`, rounded to whole heads (kept_heads); the least
        important by head_inputs or magnitude; merged only with an identical kept head), then the
        channel groups in the order given.

        transport=None gives default pruning. global_pruning ranks the channels of all selected
        channel groups together (scores computed before any pruning) and removes `sparsity` of them
        overall, but never more than `max_group_sparsity` of one group (default: all but one channel).
        progress(done, total) is called after each group.
        """
        sparsity = check_sparsity(sparsity)
        head_sparsity = sparsity if head_sparsity is None else check_sparsity(head_sparsity, "head_sparsity")
        if max_group_sparsity is not None:
            max_group_sparsity = check_sparsity(max_group_sparsity)
            if not global_pruning:
                raise ValueError("max_group_sparsity caps the groups of global pruning; pass global_pruning=True")
        indices = self._check_indices(group_indices)
        if transport is not None and fusion_rule == "reference" and len(indices) > 1:
            warnings.warn("fusion_rule='reference' makes each kept channel the sum of the channels merged into "
                          "it, which compounds over groups pruned in sequence (whole-network ResNet-50 logits "
                          "grow by about 1e9); use fusion_rule='function_preserving' for several groups",
                          stacklevel=2)
        if transport is not None and not callable(getattr(transport, "coupling", None)):
            raise TypeError(f"transport must be an OptimalTransport, a ClusterFolding (anything with "
                            f".coupling(features, importance, kept)) or None, got {type(transport).__name__}")
        check_choice(fusion_rule, FUSION_RULES, "fusion rule")
        head_indices = [index for index in indices if index >= len(self.roots)]
        indices = [index for index in indices if index < len(self.roots)]
        # conv blocks are structural (pruning other groups does not change them): counted for every group
        # first, so a group that cannot be pruned consistently stops the call before any change
        unchanged = {index: full_group(self.graph, self.roots[index]) for index in indices}
        blocks = {index: channel_blocks(group, len(group[0].idxs), self.names) for index, group in unchanged.items()}
        record = record_forward(self.model, self.example_inputs)
        ties = tied_parameters(self.model)
        skipped = self._unsafe_groups(unchanged, sparsity, blocks, record, trial=not dimensionality_preserving)
        head_plans = self._head_plans(head_indices, head_sparsity, global_pruning)
        skipped.update(check_heads(self.model, self.example_inputs, head_plans))
        if skipped:
            warnings.warn("left unpruned because pruning them would break the model: " + "; ".join(
                f"group {index} ({self.root_name(index)}): {why}" for index, why in sorted(skipped.items())),
                stacklevel=2)
        total, results = len(head_indices) + len(indices), []
        for index in head_indices:
            results.append(self._prune_heads(index, head_plans[index][1], transport, dimensionality_preserving,
                                             skipped.get(index)))
            if progress is not None:
                progress(len(results), total)
        widths = layer_widths(self.model)
        active = [index for index in indices if index not in skipped]
        plan = self._global_plan(active, sparsity, max_group_sparsity) if global_pruning and active else {}
        for index in indices:
            if index in skipped:
                results.append(self._skipped(index, unchanged[index], skipped[index]))
            else:
                results.append(self._prune_group(index, sparsity, transport, fusion_rule,
                                                 dimensionality_preserving, plan.get(index), blocks[index]))
            if progress is not None:
                progress(len(results), total)
        self.size_attributes.update(sync_attributes(self.model, record.attributes, widths))
        retie(ties)
        problem = check_outputs(self.model, self.example_inputs, record, shapes=not self.prune_output_layers)
        if problem is not None:
            raise RuntimeError(f"the pruned model no longer runs like the original on the example inputs: {problem}")
        return results

    def _head_plans(self, indices, sparsity: float, global_pruning: bool = False) -> dict[int, tuple]:
        """Head group index -> (attention block, its least important units to remove at `sparsity`).
        global_pruning spreads round(s x all units) over the blocks by the smallest next loss (the
        fraction of a block's output lost), at least one unit kept per block, except for blocks that
        share a config object (Hugging Face): a shared head count must stay equal in all of them."""
        blocks = [self.attention[index - len(self.roots)] for index in indices]
        grams = (head_grams(self.model, blocks, self.head_inputs) if self.head_inputs is not None and blocks
                 else [None] * len(blocks))
        orders = [removal_order(self.model, block, gram) for block, gram in zip(blocks, grams)]
        modules = dict(self.model.named_modules())
        counts = [block.units - kept_heads(block.units, sparsity) for block in blocks]
        if global_pruning and blocks and all(getattr(modules[block.name], "config", None) is None for block in blocks):
            counts = _global_head_counts([curve for _, curve in orders], sparsity)
        return {index: (block, sorted(order[:count]))
                for index, block, (order, _), count in zip(indices, blocks, orders, counts)}

    def _prune_heads(self, index, pruned, transport, keep_shape, skipped_reason) -> GroupResult:
        block = self.attention[index - len(self.roots)]
        result = GroupResult(index, block.units, [] if skipped_reason else pruned, fused=False,
                             producers=block.layers(), consumers=[block.o], skipped_reason=skipped_reason)
        if skipped_reason or not pruned:
            return result
        started = time.perf_counter()
        if transport is not None:
            merged = merge_twin_heads(self.model, block, pruned)
            result.fused = merged == len(pruned)
            if not result.fused:
                result.fallback_reason = (f"whole attention heads: {len(pruned) - merged} of {len(pruned)} pruned "
                                          "without merging (only a head identical to a kept one merges exactly: "
                                          "attention is not linear in q and k)")
        if keep_shape:
            zero_heads(self.model, block, pruned)
        else:
            for name, rows in prune_heads(self.model, block, pruned).items():
                origin = self.channel_origin.get(name)
                self.channel_origin[name] = rows if origin is None else origin[rows]
                result.origins[name] = self.channel_origin[name]
        result.seconds["slicing"] = time.perf_counter() - started
        self.changed = True
        return result

    def _unsafe_groups(self, groups: dict, sparsity, blocks, record, trial: bool) -> dict[int, str]:
        """Group index -> why pruning it would break the model, found before any change: torch-pruning's
        channel mapping through reshapes is probed, and groups whose widths equal an integer attribute
        that forward() reads, or whose index map looks incomplete, are pruned plainly on a copy first."""
        skipped, trials = {}, {}
        for index, group in groups.items():
            reason = probe_mapping(self.model, group, self.example_inputs, self.names)
            if reason is not None:
                skipped[index] = reason
            elif trial and (touches_attributes(group, record) or uneven_member(group, len(group[0].idxs), self.names)):
                n = len(group[0].idxs)
                width = n // blocks[index]
                pruned = block_pruned(torch.zeros(n), blocks[index], width - kept_count(width, sparsity))
                trials[self.names[self.roots[index]]] = (index, pruned)
        if trials:
            broken = breaking_groups(self.model, self.example_inputs,
                                     {name: pruned for name, (_, pruned) in trials.items()}, record,
                                     shapes=not self.prune_output_layers)
            skipped.update({trials[name][0]: why for name, why in broken.items()})
        return dict(sorted(skipped.items()))

    def _skipped(self, index: int, group, reason: str) -> GroupResult:
        n = len(group[0].idxs)
        producers, consumers = layer_roles(group, n, self.names)
        return GroupResult(index, n, [], fused=False, producers=list(producers), consumers=consumers,
                           skipped_reason=reason)

    def _global_plan(self, indices, sparsity, cap=None) -> dict[int, list[int]]:
        scores = {index: self._scores(index) for index in indices}
        flat = torch.cat([scores[i] for i in indices])
        budget = int(len(flat) * sparsity)
        if cap is not None:
            return _capped_plan(scores, budget, cap)
        threshold = flat.sort().values[budget - 1] if budget > 0 else -math.inf
        plan = {}
        for index in indices:
            order = scores[index].argsort(stable=True)
            count = min(int((scores[index] <= threshold).sum()), len(order) - 1)
            plan[index] = order[:count].tolist()
        return plan

    def _prune_group(self, index, sparsity, transport, rule, keep_shape, planned, blocks) -> GroupResult:
        seconds = {}
        started = time.perf_counter()
        group = full_group(self.graph, self.roots[index])
        n = len(group[0].idxs)
        check_finite_group(group, self.names)
        if planned is None:
            scores = self._scores(index, group)
            if blocks > 1:
                width = n // blocks
                pruned = block_pruned(scores, blocks, width - kept_count(width, sparsity))
            else:
                pruned = scores.argsort(stable=True)[: n - kept_count(n, sparsity)].tolist()
        else:
            scores, pruned = (self._scores(index, group) if transport is not None or blocks > 1 else None), planned
            if blocks > 1:  # the global plan's share of this group, taken alike from every block (rounded
                # down, so never more than the plan, hence the cap, allows)
                pruned = block_pruned(scores, blocks, min(n // blocks - 1, len(planned) // blocks))
        seconds["importance"] = time.perf_counter() - started
        kept = torch.tensor(sorted(set(range(n)) - set(pruned)), dtype=torch.long)
        producers, consumers = layer_roles(group, n, self.names)
        result = GroupResult(index, n, sorted(pruned), fused=False, seconds=seconds, producers=list(producers),
                             consumers=consumers)
        if pruned and transport is not None:
            try:
                members = group_members(group, n, self.names, rule=rule)
            except UnsupportedGroup as reason:
                result.fallback_reason = str(reason)
                warnings.warn(f"group {index} (root {self.names[self.roots[index]]}) cannot be fused because "
                              f"of {reason}; it is pruned without fusion", stacklevel=3)
            else:
                started = time.perf_counter()
                roles = getattr(transport, "feature_roles", ("producer", "consumer"))
                features = channel_features(members, roles)
                coupling = (block_coupling(transport, features, scores, kept, blocks) if blocks > 1
                            else transport.coupling(features, scores, kept))
                producer_map, consumer_map = transport_maps(coupling, rule)
                seconds["transport"] = time.perf_counter() - started
                started = time.perf_counter()
                fuse_members(members, kept, producer_map, consumer_map)
                seconds["fusion"] = time.perf_counter() - started
                result.fused, result.producer_map = True, producer_map
        started = time.perf_counter()
        if keep_shape:
            zero_channels(group_members(group, n, self.names, strict=False) if pruned else [],
                          torch.tensor(pruned))
        else:
            result.origins = self._track_origins(producers, kept)
            prune_channels(self.graph, group, pruned)
        seconds["slicing"] = time.perf_counter() - started
        self.changed = self.changed or bool(pruned)
        if needs_data(self.importance):
            self.model.zero_grad(set_to_none=True)
        return result

    def _track_origins(self, producers: dict[str, torch.Tensor], kept: torch.Tensor) -> dict[str, torch.Tensor]:
        modules = dict(self.model.named_modules())
        for name, positions in producers.items():
            layer = modules[name]
            origin = self.channel_origin.get(name, torch.arange(out_channels(layer)))
            self.channel_origin[name] = origin[positions[kept].flatten()]
        return {name: self.channel_origin[name] for name in producers}


def _global_head_counts(curves: list[list[float]], sparsity: float) -> list[int]:
    """Units to remove per block: round(s x all units) in all, each next one where it adds the least
    to its block's lost fraction (curves[b][k]: lost after removing k + 1 units), never a block's last."""
    budget = round(sparsity * sum(len(curve) for curve in curves))
    counts = [0] * len(curves)
    for _ in range(budget):
        steps = [(curve[k] - (curve[k - 1] if k else 0.0), block) for block, (curve, k) in enumerate(zip(curves, counts))
                 if k < len(curve) - 1]
        if not steps:
            break
        counts[min(steps)[1]] += 1
    return counts


def _capped_plan(scores: dict[int, torch.Tensor], budget: int, cap: float) -> dict[int, list[int]]:
    """The `budget` lowest-scored channels over all groups, skipping a group's channels once it has
    lost `cap` of them (so the budget is met by the next lowest elsewhere, where there are any)."""
    room = {index: len(s) - kept_count(len(s), cap) for index, s in scores.items()}
    candidates = sorted((float(score), index, position) for index, s in scores.items()
                        for position, score in enumerate(s.tolist()))
    plan: dict[int, list[int]] = {index: [] for index in scores}
    for _, index, position in candidates:
        if budget <= 0:
            break
        if len(plan[index]) < room[index]:
            plan[index].append(position)
            budget -= 1
    return plan


def check_finite_group(group, names) -> None:
    for item in group.items:
        module = item.dep.target.module
        if isinstance(module, nn.Module):
            for pname, param in module.named_parameters(recurse=False):
                if not torch.isfinite(param).all():
                    raise ValueError(f"{names.get(module, module)}.{pname} contains NaN or inf values; "
                                     "cannot prune it")
