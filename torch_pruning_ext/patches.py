"""What a Conv1d/Conv2d/Linear layer reads: its input as patch rows (im2col), and its output for other weights.

The least-squares reconstruction works on the patches a layer multiplies by its weight. These helpers
give one row per output position, features in (kernel row, kernel column, channel) order, and the
layer's weight flattened in that same order: a patch row is then a copy of kernel-many contiguous
channel vectors of the channels-last input (much faster than F.unfold, whose channel-major order
gathers single values). Every padding mode and `padding="same"` are handled by padding explicitly.
A Conv1d is a Conv2d of height 1; a Linear layer's positions are its input's leading dimensions
after the first (tokens), and each sample's rows are its tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PATCH_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def padded_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input padded as the layer pads it, as (N, C, H, W) (a Conv1d input gets H = 1)."""
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    return x.unsqueeze(2) if isinstance(layer, nn.Conv1d) else x


def _geometry(layer: nn.Module):
    """kernel, stride and dilation as 2-D tuples (a Conv1d is 1 x L)."""
    if isinstance(layer, nn.Conv1d):
        return (1, layer.kernel_size[0]), (1, layer.stride[0]), (1, layer.dilation[0])
    return layer.kernel_size, layer.stride, layer.dilation


def _output_size(layer: nn.Module, height: int, width: int) -> tuple[int, int]:
    kernel, stride, dilation = _geometry(layer)
    return ((height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
            (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1)


def samples_of(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as (samples, ...): images for a convolution, (N, tokens, features) for a Linear."""
    return x if not isinstance(layer, nn.Linear) else x.reshape(x.shape[0], -1, x.shape[-1])


def positions_per_sample(layer: nn.Module, x: torch.Tensor) -> int:
    """Output positions of one sample: spatial outputs of a convolution, tokens of a Linear."""
    if isinstance(layer, nn.Linear):
        return x[0].numel() // x.shape[-1]
    height, width = _output_size(layer, *padded_input(layer, x[:1]).shape[2:])
    return height * width


def weight_rows(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """(outputs, features): a weight of the layer's shape flattened in patch-row order."""
    if isinstance(layer, nn.Linear):
        return weight
    if isinstance(layer, nn.Conv1d):
        return weight.transpose(1, 2).reshape(len(weight), -1)
    return weight.permute(0, 2, 3, 1).reshape(len(weight), -1)


def rows_to_weight(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The inverse of weight_rows: (outputs, features) back to the layer's weight shape."""
    if isinstance(layer, nn.Linear):
        return rows
    shape = layer.weight.shape
    if isinstance(layer, nn.Conv1d):
        return rows.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)
    return rows.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)


def patch_rows(layer: nn.Module, x: torch.Tensor, picked: torch.Tensor | None = None,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """(positions, features): every patch the layer reads in `x` (samples as from samples_of), one row
    per output position of every sample, features in the order of weight_rows; with `picked` (indices
    into those rows), only those rows, gathered without forming the others. `shift` (one value per
    input channel) is subtracted from the input after padding (padded positions read -shift too): on
    the input, not on the kernel-times larger patches."""
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        rows = rows if picked is None else rows[picked]
        return rows if shift is None else rows - shift
    kernel, stride, dilation = _geometry(layer)
    padded = padded_input(layer, x)
    padded = padded if shift is None else padded - shift.view(1, -1, 1, 1)
    padded = padded.permute(0, 2, 3, 1).contiguous()  # N x H x W x C
    count, height, width, channels = padded.shape
    out_h, out_w = _output_size(layer, height, width)
    row, column = width * channels, channels
    view = padded.as_strided((count, out_h, out_w, kernel[0], kernel[1], channels),
                             (height * row, stride[0] * row, stride[1] * column,
                              dilation[0] * row, dilation[1] * column, 1))
    if picked is None:
        return view.reshape(count * out_h * out_w, -1)
    # each picked row is kernel-many channel vectors of the input: gathered whole, by their row numbers in
    # the (N*H*W) x C input
    sample, place = picked // (out_h * out_w), picked % (out_h * out_w)
    first = sample * (height * width) + (place // out_w) * (stride[0] * width) + (place % out_w) * stride[1]
    taps = (torch.arange(kernel[0], device=x.device).view(-1, 1) * (dilation[0] * width)
            + torch.arange(kernel[1], device=x.device) * dilation[1]).view(1, -1)
    vectors = padded.view(-1, channels).index_select(0, (first.view(-1, 1) + taps).view(-1))
    return vectors.view(len(picked), -1)


def output_rows(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                picked: torch.Tensor | None = None) -> torch.Tensor:
    """(positions, outputs): what the layer computes from `x` with `weight` (of the layer's weight
    shape) instead of its own, no bias, in the row order of patch_rows (only the rows `picked`, if
    given); all positions run as one (fast) convolution whose patches are never formed, a few picked
    ones as their patches times the weight."""
    if picked is not None:
        return patch_rows(layer, x, picked) @ weight_rows(layer, weight).t()
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]) @ weight.t()
    result = convolve(layer, x, weight)  # N x out x h x w
    return result.permute(0, 2, 3, 1).reshape(-1, result.shape[1])


LAG_MIN_KERNEL = 8  # 1-D kernels at least this long get their Gram matrix from lag correlations


def lag_kernel(layer: nn.Module) -> int:
    """The length K of a 1-D kernel read with stride 1 and dilation 1 ((K, 1) or (1, K) Conv2d, Conv1d),
    when K >= LAG_MIN_KERNEL, else 0: for those, patch_gram costs about K times less than forming patches."""
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)) or layer.groups != 1:
        return 0
    kernel, stride, dilation = _geometry(layer)
    if stride != (1, 1) or dilation != (1, 1) or min(kernel) != 1:
        return 0
    return max(kernel) if max(kernel) >= LAG_MIN_KERNEL else 0


def _sequences(layer: nn.Module, padded: torch.Tensor) -> torch.Tensor:
    """(sequences, channels, length): the padded 2-D input cut along the kernel's axis."""
    kernel, _, _ = _geometry(layer)
    if kernel[1] == 1:  # (K, 1): every column is a sequence
        return padded.permute(0, 3, 1, 2).reshape(-1, padded.shape[1], padded.shape[2])
    return padded.permute(0, 2, 1, 3).reshape(-1, padded.shape[1], padded.shape[3])


def patch_gram(layer: nn.Module, padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum over output positions of row row^T (float64, features x features), sum of the rows
    (float64), number of positions) of the patch rows of a lag_kernel layer, from `padded`
    (padded_input). With stride 1 the product of taps k and k + d at position p is the product of the
    input at q = p + k and q + d: the lag-d products are summed once per q and the block (k, k + d) is a
    difference of their running sums, so the cost is channels^2 x length x K per sequence, not
    channels^2 x length x K^2."""
    taps = lag_kernel(layer)
    sequences = _sequences(layer, padded)  # S x C x L
    channels, length = sequences.shape[1], sequences.shape[2]
    by_position = sequences.permute(2, 0, 1).contiguous()  # L x S x C: each lag is one batched product
    positions = length - taps + 1
    gram = torch.zeros(taps, channels, taps, channels, dtype=torch.float64, device=padded.device)
    first = torch.arange(taps, device=padded.device)
    for lag in range(taps):
        products = torch.bmm(by_position[:length - lag].transpose(1, 2), by_position[lag:])  # L-lag x C x C
        running = torch.cat([products.new_zeros(1, channels, channels), products]).double().cumsum(0)
        starts = first[:taps - lag]
        blocks = running[starts + positions] - running[starts]  # taps-lag x C x C
        gram[starts, :, starts + lag, :] = blocks
        if lag:
            gram[starts + lag, :, starts, :] = blocks.transpose(1, 2)
    totals = torch.cat([sequences.new_zeros(channels, 1), sequences.sum(0)], dim=1).double().cumsum(1)  # C x L+1
    sums = (totals[:, first + positions] - totals[:, first]).t().reshape(-1)  # (k, c) order
    size = taps * channels
    return gram.reshape(size, size), sums, positions * len(sequences)


def patch_cross(layer: nn.Module, padded: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """(features, outputs): the sum over output positions of row output^T, the patch rows of `padded`
    (padded_input) against per-position `outputs` (N x out x h x w): a convolution's weight gradient,
    computed without forming patches."""
    kernel, stride, dilation = _geometry(layer)
    weight = torch.nn.grad.conv2d_weight(padded, (outputs.shape[1], padded.shape[1]) + tuple(kernel), outputs,
                                         stride=stride, dilation=dilation)
    return weight.permute(0, 2, 3, 1).reshape(len(weight), -1).t()


def output_map(layer: nn.Module, padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """N x out x h x w: the layer's convolution (no bias) of `padded` (padded_input) with `weight`."""
    _, stride, dilation = _geometry(layer)
    weight = weight.unsqueeze(2) if isinstance(layer, nn.Conv1d) else weight
    return F.conv2d(padded, weight, stride=stride, dilation=dilation)


def convolve(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """N x out x h x w: the layer's convolution (no bias) of its input `x` with `weight`; zero padding is
    the convolution's own, as in the layer (no padded copy of the input)."""
    if layer.padding_mode != "zeros":
        return output_map(layer, padded_input(layer, x), weight)
    if isinstance(layer, nn.Conv1d):
        return F.conv1d(x, weight, stride=layer.stride, padding=layer.padding, dilation=layer.dilation).unsqueeze(2)
    return F.conv2d(x, weight, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
