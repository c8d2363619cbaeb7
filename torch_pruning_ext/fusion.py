"""Transport-map compression of a torch-pruning group.

The fused values are written into the rows/columns of the channels that stay; the stock
``group.prune()`` of torch-pruning then slices them out unchanged. So any map works with
unmodified upstream torch-pruning, and the identity map reproduces plain pruning bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as F

from .bn_folding import is_channel_uniform
from .checks import check_choice
from .groups import ROOT_TYPES

FUSION_RULES = ("reference", "function_preserving")

_PRODUCER_FNS = {F.prune_conv_out_channels, F.prune_linear_out_channels,
                 F.prune_depthwise_conv_out_channels, F.prune_depthwise_conv_in_channels}
_CONSUMER_FNS = {F.prune_conv_in_channels, F.prune_linear_in_channels}
_BN_FNS = {F.prune_batchnorm_out_channels, F.prune_batchnorm_in_channels}
# LayerNorm and GroupNorm weights and biases scale and shift each channel after the normalisation over
# channels: merged like other per-channel vectors (the normalisation itself sees fewer channels, as it
# does after plain pruning)
_NORM_FNS = {F.prune_layernorm_out_channels, F.prune_layernorm_in_channels, F.prune_groupnorm_out_channels,
             F.prune_groupnorm_in_channels}
_EMBEDDING_FNS = {F.prune_embedding_out_channels}  # an embedding table's columns are its out-channels


@dataclass
class Member:
    """One parameterised member of a group and where each group channel sits in it.

    positions[c] lists the indices along `dim` that belong to group channel c (more than one when a
    flatten replicates a channel into several Linear inputs). Roles: "producer" (out-channel rows),
    "consumer" (in-channel columns), "affine" (per-channel vectors such as an unfolded BatchNorm's
    statistics or a layer_scale parameter, merged as mass-weighted averages) and "slice" (an identity
    BatchNorm, e.g. after folding, that is only sliced).
    """
    name: str
    module: nn.Module | nn.Parameter
    role: str
    positions: torch.Tensor  # (n, replicas) long
    dim: int = 0

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this member mixes along `dim` (their gradients follow the weights)."""
        if self.role == "slice":
            return []
        if isinstance(self.module, nn.Parameter):
            return [self.module]
        if self.role == "affine":
            names = ("weight", "bias", "running_mean", "running_var")
        else:
            names = ("weight", "bias") if self.role == "producer" else ("weight",)
        return [t for t in (getattr(self.module, name, None) for name in names) if t is not None]

    @property
    def conv_groups(self) -> int:
        """Blocks of a grouped (not depthwise) convolution consumer, 1 otherwise: its weight holds
        in_channels / groups columns, and the column of input c serves only the rows of c's block."""
        module = self.module
        if self.role == "consumer" and isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            return module.groups
        return 1


class UnsupportedGroup(Exception):
    """The group has a member whose channels cannot be mixed; the message names it."""


def _positions(idxs, root_idxs, n: int, name: str) -> torch.Tensor:
    if any(r is None for r in root_idxs):
        raise UnsupportedGroup(f"{name}: channels without a root index")
    per_channel: list[list[int]] = [[] for _ in range(n)]
    for idx, root in zip(idxs, root_idxs):
        per_channel[root].append(int(idx))
    counts = {len(p) for p in per_channel}
    if len(counts) != 1 or 0 in counts:
        raise UnsupportedGroup(f"{name}: group channels map to unequal numbers of positions")
    return torch.tensor([sorted(p) for p in per_channel], dtype=torch.long)


def _producer_behind(node, depth: int = 3):
    """The Conv/Linear node a value comes from, through at most `depth` weightless elementwise ops
    (an activation), or None."""
    for _ in range(depth + 1):
        if isinstance(node.module, ROOT_TYPES):
            return node
        if not isinstance(node.module, tp.ops._ElementWiseOp) or len(node.inputs) != 1:
            return None
        node = node.inputs[0]
    return None


def _value_source(node, depth: int = 4):
    """The module a layer's input comes from, looking through the reshapes and matrix products torch
    traces around a Linear applied to 3-D inputs (weights' transposes are not values)."""
    for _ in range(depth):
        if not isinstance(node.module, (tp.ops._ElementWiseOp, tp.ops._ReshapeOp)):
            break
        values = [i for i in node.inputs if "TBackward" not in str(getattr(i.module, "_grad_fn", ""))]
        if len(values) != 1:
            break
        node = values[0]
    return node.module


def gated_pair(group, names: dict) -> str | None:
    """'a and b' when the group's channels are the elementwise product of two of its layers that read
    the same input (a gated MLP: silu(gate(x)) * up(x)): no map of their rows merges such a product
    (an average of two gates times an average of two values is not the average of the products), so
    these channels are pruned, not merged. A squeeze-and-excitation scale reads another input and is
    not such a pair."""
    for item in group.items:
        module = item.dep.target.module
        if not isinstance(module, tp.ops._ElementWiseOp) or "Mul" not in str(getattr(module, "_grad_fn", "")):
            continue
        producers = [_producer_behind(node) for node in item.dep.target.inputs]
        if len(producers) != 2 or not all(producers) or producers[0] is producers[1]:
            continue
        sources = [[_value_source(node) for node in producer.inputs] for producer in producers]
        if len(sources[0]) == 1 and sources[0] == sources[1]:
            return " and ".join(names.get(node.module, type(node.module).__name__) for node in producers)
    return None


def group_members(group, n: int, names: dict, strict: bool = True,
                  rule: str = "function_preserving") -> list[Member]:
    """Classify the group's items; raises UnsupportedGroup naming any member fusion cannot mix
    (or a gated pair, see gated_pair).

    strict=False skips such members instead (zeroing channels needs only the Conv/Linear ones).
    Under the reference rule, whose producer rows are sums, per-channel statistics and scales cannot
    follow (an average would no longer centre a summed channel): such "affine" members are refused.
    """
    pair = gated_pair(group, names) if strict else None
    if pair is not None:
        raise UnsupportedGroup(f"{pair}: gated channels (their outputs are multiplied), which no map of the rows merges")
    members = []
    for item in group.items:
        module, fn = item.dep.target.module, item.dep.handler
        name = names.get(module, f"<unnamed {type(module).__name__}>")
        try:
            role, positions, dim = _classify(module, fn, name, item, n)
        except UnsupportedGroup:
            if strict:
                raise
            continue
        if role == "affine" and rule == "reference" and strict:
            raise UnsupportedGroup(f"{name}: per-channel statistics or scales, which only the function_preserving "
                                   "rule merges (or fold BatchNorm first)")
        if role is not None:
            members.append(Member(name, module, role, positions, dim))
    return members


def _classify(module, fn, name: str, item, n: int):
    """(role, positions, dim) of one group item; role None for weightless nodes (reshape, add, ...)."""
    if isinstance(module, nn.Parameter):
        # torch-pruning prunes a bare parameter along its last non-singleton dimension (its output side
        # for x @ W): its slices are averaged like producer rows, right for scales, biases, tokens and
        # additive embeddings
        dim = getattr(item.dep.target, "pruning_dim", -1) % module.dim()
        return "affine", _positions(item.idxs, item.root_idxs, n, name), dim
    if fn not in _BN_FNS and next(module.parameters(recurse=False), None) is None:
        return None, None, 0
    if fn in _NORM_FNS:
        return "affine", _positions(item.idxs, item.root_idxs, n, name), 0
    if getattr(module, "transposed", False):
        raise UnsupportedGroup(f"{name}: transposed convolution")
    positions = _positions(item.idxs, item.root_idxs, n, name)
    if fn in _PRODUCER_FNS:
        return "producer", positions, 0
    if fn in _EMBEDDING_FNS:
        return "producer", positions, 1
    if fn in _CONSUMER_FNS:
        return "consumer", positions, 1
    if fn in _BN_FNS:
        return ("slice" if is_channel_uniform(module) else "affine"), positions, 0
    raise UnsupportedGroup(f"{name}: {type(module).__name__} via {getattr(fn, '__name__', fn)}")


def uneven_member(group, n: int, names: dict) -> str | None:
    """Why torch-pruning's index map of the group looks incomplete (a weighted member on which the group
    channels land on unequal numbers of positions, e.g. a chunk it follows into only one half), or None."""
    for item in group.items:
        module = item.dep.target.module
        weighted = isinstance(module, nn.Parameter) or next(module.parameters(recurse=False), None) is not None
        if weighted:
            try:
                _positions(item.idxs, item.root_idxs, n, names.get(module, type(module).__name__))
            except UnsupportedGroup as reason:
                return str(reason)
    return None


def layer_roles(group, n: int, names: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Conv/Linear producers (name -> channel positions) and consumer names of any group.

    Unlike group_members this never refuses a group: it serves bookkeeping, not fusion.
    """
    producers, consumers = {}, []
    for item in group.items:
        module, fn = item.dep.target.module, item.dep.handler
        if not isinstance(module, ROOT_TYPES) or module not in names:
            continue
        if fn in _PRODUCER_FNS:
            try:
                producers[names[module]] = _positions(item.idxs, item.root_idxs, n, names[module])
            except UnsupportedGroup:
                continue
        elif fn in _CONSUMER_FNS:
            consumers.append(names[module])
    return producers, consumers


def _grouped_cells(member: Member, channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, column) of a grouped-conv consumer's weight that serve each of `channels`:
    rows (len, out_channels / groups) and column (len,)."""
    module, blocks = member.module, member.conv_groups
    width, height = module.in_channels // blocks, module.out_channels // blocks
    position = member.positions[channels, 0]
    rows = (position // width)[:, None] * height + torch.arange(height)
    return rows, position % width


def _rows(member: Member, tensor: torch.Tensor) -> torch.Tensor:
    """(n, replicas, rest) view of a tensor's channel slices along the member's channel dimension."""
    if member.conv_groups > 1 and tensor.dim() > 1:
        rows, column = _grouped_cells(member, torch.arange(len(member.positions)))
        return tensor[rows, column[:, None]].reshape(len(column), 1, -1)
    moved = tensor.movedim(member.dim if tensor.dim() > 1 else 0, 0)
    picked = moved[member.positions.flatten()]
    return picked.reshape(member.positions.shape[0], member.positions.shape[1], -1)


def channel_features(members: list[Member], roles=("producer", "consumer")) -> torch.Tensor:
    """Feature vector per channel: producer weight rows and consumer weight columns, concatenated
    (only the members whose role is in `roles`). Biases and BN members are not included, as in the
    released code.
    """
    parts = [_rows(m, m.module.weight.detach()).flatten(1) for m in members if m.role in roles]
    if not parts:
        raise UnsupportedGroup("the group has no Conv/Linear weights to describe its channels")
    return torch.cat(parts, dim=1)


def transport_maps(coupling: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(producer_map, consumer_map), each k x n, from a coupling G (n x k).

    reference: T = G^T with every column divided by its source mass (each source sums to 1),
    used on both sides, so k kept rows are sums of sources.
    function_preserving: producers take the row-normalised map (mass-weighted average of the
    channels merged into each target), consumers the column-normalised one (their sum), so exact
    twin channels are merged without changing the network's function.
    """
    check_choice(rule, FUSION_RULES, "fusion rule")
    plan = coupling.t()
    source_mass = plan.sum(dim=0, keepdim=True)
    by_source = torch.where(source_mass > 0, plan / torch.where(source_mass > 0, source_mass, 1), 0)
    if rule == "reference":
        return by_source, by_source
    target_mass = plan.sum(dim=1, keepdim=True)
    by_target = torch.where(target_mass > 0, plan / torch.where(target_mass > 0, target_mass, 1), 0)
    return by_target, by_source


def identity_map(n: int, kept: torch.Tensor) -> torch.Tensor:
    """The k x n map that keeps each kept channel as it is: fusion with it equals plain pruning."""
    out = torch.zeros(len(kept), n, dtype=torch.float64)
    out[torch.arange(len(kept)), kept] = 1.0
    return out


@torch.no_grad()
def _mix_into(member: Member, tensor: torch.Tensor, mix: torch.Tensor, kept: torch.Tensor) -> None:
    """Write mix @ (channel slices of tensor) into the slices of the kept channels, in place."""
    fused = torch.einsum("jn,nrd->jrd", mix.to(tensor.dtype), _rows(member, tensor))
    if member.conv_groups > 1 and tensor.dim() > 1:
        rows, column = _grouped_cells(member, kept)
        tensor[rows, column[:, None]] = fused.reshape(rows.shape + tensor.shape[2:])
        return
    target = member.positions[kept].flatten()
    moved = tensor.movedim(member.dim if tensor.dim() > 1 else 0, 0)
    moved[target] = fused.reshape((len(target),) + moved.shape[1:])


def averaging_map(producer_map: torch.Tensor) -> torch.Tensor:
    """Rows summing to one: each kept channel's per-channel statistics become the weighted average
    of those merged into it (equal to the producer map under the function-preserving rule)."""
    total = producer_map.sum(dim=1, keepdim=True)
    return torch.where(total > 0, producer_map / torch.where(total > 0, total, 1), 0)


@torch.no_grad()
def untie_shared(members: list[Member]) -> None:
    """Give every member that shares a tensor with an earlier one (tied input and output embeddings)
    its own copy, so each is mixed once, by its own map."""
    seen = set()
    for member in members:
        if isinstance(member.module, nn.Parameter):
            continue
        for name in ("weight", "bias"):
            tensor = getattr(member.module, name, None)
            if not isinstance(tensor, nn.Parameter):
                continue
            if id(tensor) in seen:
                setattr(member.module, name, nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad))
            seen.add(id(getattr(member.module, name)))


def fuse_members(members: list[Member], kept: torch.Tensor, producer_map: torch.Tensor,
                 consumer_map: torch.Tensor) -> None:
    """Apply the maps to every member: weights, biases, per-channel statistics and their gradients
    (a tensor two members share is untied first: untie_shared)."""
    maps = {"producer": producer_map, "consumer": consumer_map, "affine": averaging_map(producer_map)}
    untie_shared(members)
    for member in members:
        for tensor in member.tensors():
            _mix_into(member, tensor.data, maps[member.role], kept)
            if getattr(tensor, "grad", None) is not None:
                _mix_into(member, tensor.grad, maps[member.role], kept)


@torch.no_grad()
def zero_channels(members: list[Member], pruned: torch.Tensor) -> None:
    """Zero the pruned channels' rows, biases and columns (dimensionality-preserving pruning)."""
    for member in members:
        if member.role not in ("producer", "consumer"):
            continue
        weight = member.module.weight.data
        if member.conv_groups > 1:
            rows, column = _grouped_cells(member, pruned)
            weight[rows, column[:, None]] = 0
            continue
        where = member.positions[pruned].flatten()
        weight.movedim(member.dim, 0)[where] = 0
        if member.role == "producer" and getattr(member.module, "bias", None) is not None:
            member.module.bias.data[where] = 0


def group_root(group) -> tuple[nn.Module, object]:
    return group[0].dep.target.module, group[0].dep.handler


def prune_channels(graph: tp.DependencyGraph, group, pruned: list[int]) -> None:
    """Slice out `pruned` channels of the group with torch-pruning's own handlers."""
    if pruned:
        module, fn = group_root(group)
        graph.get_pruning_group(module, fn, sorted(pruned)).prune()
