"""Models and helpers shared by several test modules (test modules never import each other)."""
import gzip
import struct

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from torch_pruning_ext.experiments.models import randomize_batchnorms  # noqa: F401  (tests import it from here)
from torch_pruning_ext.fusion import group_members
from torch_pruning_ext.groups import full_group


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


class FirstOfPairs(tp.importance.Importance):
    """Channels 0..n/2-1 are important, their twins n/2..n-1 are not."""

    def __call__(self, group):
        n = len(group[0].idxs)
        return torch.cat([torch.ones(n // 2) * 2, torch.ones(n - n // 2)])


def make_twins(model, pruner, index):
    """Make channel c + n/2 an exact copy of channel c in every member of the group."""
    group = full_group(pruner.graph, pruner.roots[index])
    n = len(group[0].idxs)
    half = n // 2
    with torch.no_grad():
        for member in group_members(group, n, pruner.names):
            if member.role == "slice":
                continue
            source, twin = member.positions[:half].flatten(), member.positions[half:].flatten()
            if member.role == "producer":
                member.module.weight[twin] = member.module.weight[source]
                member.module.bias[twin] = member.module.bias[source]
            else:
                member.module.weight[:, twin] = member.module.weight[:, source]


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)  # 108 + 4 params
        self.fc = nn.Linear(4 * 8 * 8, 5)          # 1280 + 5 params

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))
