"""Grouped convolutions split a group's channels into blocks that must be pruned alike.

A convolution with `groups=g` (not depthwise) reads its input channels in g contiguous blocks and
torch-pruning slices its weight assuming every block loses the same local channels; its output
block b is computed from input block b only. So a group touching such a layer (as producer or
consumer) removes the same local positions from every block, and fusion may only merge channels
of one block: the transport is solved per block and the blocks' couplings put side by side.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch_pruning.pruner import function as F


_GROUPED_FNS = {F.prune_conv_out_channels, F.prune_conv_in_channels}  # depthwise convs get their own


def _grouped(item) -> bool:
    """A grouped, not depthwise, convolution: told by the handler torch-pruning chose when it traced
    the model (a grouped conv pruned to one channel per block must stay grouped)."""
    module = item.dep.target.module
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and item.dep.handler in _GROUPED_FNS


def channel_blocks(group, n: int, names: dict) -> int:
    """Number of blocks the group's n channels fall into (the lcm of the grouped convolutions'
    `groups` touching them; 1 without any)."""
    blocks = 1
    for item in group.items:
        module = item.dep.target.module
        if not _grouped(item):
            continue
        side = module.out_channels if item.dep.handler == F.prune_conv_out_channels else module.in_channels
        position = {int(root): int(idx) for idx, root in zip(item.idxs, item.root_idxs) if root is not None}
        if side != n or any(position.get(channel) != channel for channel in range(n)):
            raise ValueError(f"grouped convolution {names.get(module, type(module).__name__)} takes channels "
                             "from several groups; this group cannot be pruned consistently")
        blocks = math.lcm(blocks, module.groups)
    if n % blocks:
        raise ValueError(f"{n} channels cannot be split into {blocks} convolution groups")
    return blocks


def block_pruned(scores: torch.Tensor, blocks: int, count: int) -> list[int]:
    """`count` channels per block at the same local positions: the lowest of the scores summed
    over blocks (how torch-pruning's MetaPruner ranks grouped channels)."""
    width = len(scores) // blocks
    local = scores.view(blocks, width).sum(0).argsort(stable=True)[:count]
    return sorted((local[None, :] + width * torch.arange(blocks)[:, None]).flatten().tolist())


def block_coupling(transport, features: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor,
                   blocks: int) -> torch.Tensor:
    """(n x k) coupling that moves mass only within a block, solved block by block."""
    n, width = len(scores), len(scores) // blocks
    kept_local = kept[: len(kept) // blocks]  # kept is sorted and alike in every block
    share = len(kept_local)
    coupling = torch.zeros(n, len(kept), dtype=torch.float64)
    for block in range(blocks):
        rows = slice(block * width, (block + 1) * width)
        coupling[rows, block * share:(block + 1) * share] = transport.coupling(
            features[rows], scores[rows], kept_local).double() / blocks
    return coupling
