"""Reconstruction after pruning: every Conv/Linear layer refitted by least squares so that, from the
pruned model's own inputs, it reproduces what the original layer outputs for the channels it keeps.

Layers are refitted in run order, each before it runs, so that its corrected output feeds the next
(fitting later layers in parallel on uncorrected inputs, and refining, measured 0.7-1.7 points worse on
VGG11-BN). Its cost is bounded by design: each layer's fit accumulates Gram matrices (float64 sums
over chunks) of at most RECONSTRUCT_POSITIONS_PER_FEATURE positions per weight column (for a long
1-D kernel from lag correlations, without forming patches: patches.patch_gram), and may cost
`cost` times its share of one forward pass; a layer whose output-space fit would cost more, or whose
Gram matrices exceed `memory_budget`, gets the cheaper input-space channel map (reported with why).
One pass: the calibration samples, shuffled, run in chunks (`batch_size`, 384 by default), each
through both models in worker threads that pause before every layer. A layer reads as many samples
as its fit wants from the first chunks (of the last one a random part, drawn anew for each layer): those
chunks are brought to it, the layer is refitted, and they later run on through the corrected layer.
Every sample thus runs through each model once, and memory is set by one chunk's activations plus
what chunks waiting at deeper layers hold: layers with many positions per sample (large, early
activations) want few samples, deep layers with few positions want many samples but hold little
each. Layers that fit the same images' errors one after the other do worse: VGG11-BN, Model Folding
s=0.7, 91.36% with every early layer reading the same 256 samples, 91.41% / 91.47% / 91.58% with each
reading its own 256 of a chunk of 384 / 512 / 1024 (the chunk sets memory: 384 by default).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading

import torch
import torch.nn as nn

from .checks import check_choice
from .groups import ROOT_TYPES, out_channels
from .inputs import batch_length, map_tensors, run_model, take
from .modes import as_fast_input, eval_mode, fast_layout
from .patches import (PATCH_TYPES, convolve, lag_kernel, output_map, output_rows, padded_input, patch_cross, patch_gram,
                      patch_rows, positions_per_sample, rows_to_weight, samples_of, weight_rows)
from .standard_layers import set_bias

RECONSTRUCT_RIDGE = 1e-3  # ridge lambda, relative to the mean diagonal of the pruned input's Gram matrix
RECONSTRUCT_SPACES = ("output", "input")
RECONSTRUCT_POSITIONS = 2 ** 18  # at most this many output positions per layer for the output-space fit
RECONSTRUCT_POSITIONS_PER_FEATURE = 32  # and at most this many per feature (weight column) of the layer
RECONSTRUCT_MIN_POSITIONS = 4  # per feature: with fewer, the layer falls back to the input-space map
RECONSTRUCT_MIN_SAMPLES = 256  # the positions are drawn from at least this many samples (or all): positions
#                                within one sample are correlated
RECONSTRUCT_COST = 2.0  # a layer's output-space fit may cost this many times (its own multiply-adds on the
#                         calibration set + an even share of the whole model's)
_FREE_MACS = 2 ** 30  # an allowance of at least this (about 15 ms on two cores): small fits always fit
RECONSTRUCT_BATCH = 384  # samples per chunk unless batch_size says otherwise
MAX_CHUNKS = 256  # calibration samples run in at most this many chunks (two threads each)
_GRAM_CHUNK_BYTES = 64 * 2 ** 20  # layer inputs (or patches) per accumulation step
_GRAM_BLOCK = 512  # rows per block of the Gram matrix: only blocks on and below the diagonal are computed


class _Stop(Exception):
    """Ends a forward pass early (every layer refitted, or the other side failed)."""


def _solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float, intercept: bool) -> torch.Tensor:
    """argmin_S |target - A^T S|^2 + lambda |S|^2 from the Gram matrices G = A A^T and
    cross = A target (the intercept row is not penalised); lambda is `ridge` times the mean
    diagonal of G."""
    size = gram.shape[0] - int(intercept)
    scale = gram.diagonal()[:size].mean().clamp_min(1e-12) if size else gram.new_tensor(1.0)
    penalty = torch.full((gram.shape[0],), ridge * float(scale), dtype=gram.dtype, device=gram.device)
    if intercept:
        penalty[-1] = 1e-12 * float(scale)
    system = gram + torch.diag(penalty)
    if not (torch.isfinite(system).all() and torch.isfinite(cross).all()):
        raise RuntimeError("reconstruction: a layer's least-squares statistics are not finite (its inputs in "
                           "the pruned or the original model reached inf or NaN on the calibration data)")
    factor, info = torch.linalg.cholesky_ex(system)  # symmetric positive definite: half the work of LU
    if int(info) == 0:
        return torch.cholesky_solve(cross, factor)
    # singular even with the ridge (e.g. ridge=0 and dead channels)
    return torch.linalg.lstsq(system.cpu(), cross.cpu()).solution.to(gram.device)


def _add_lower_gram(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """gram += rows^T rows (float64), computing only the blocks on and below the diagonal (the product's
    cost nearly halves for wide layers; _mirror_lower fills the rest once at the end)."""
    for start in range(0, rows.shape[1], _GRAM_BLOCK):
        end = min(start + _GRAM_BLOCK, rows.shape[1])
        gram[start:end, :end] += (rows[:, start:end].t() @ rows[:, :end]).double()


def _mirror_lower(gram: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is gram's."""
    lower = gram.tril()
    return lower + lower.tril(-1).t()


def _squares(x: torch.Tensor) -> float:
    """Sum of squares, accumulated per column in the tensor's precision and across columns in float64."""
    return float((x * x).sum(0).double().sum())


def _original_rows(original: nn.Module, selection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (weight, bias) of the original layer's output channels the pruned layer stands for:
    `selection` is an index per kept channel, or a k x n map mixing the original rows (fused rows)."""
    weight = original.weight.detach().double()
    bias = original.bias.detach().double() if original.bias is not None else \
        torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    if selection.is_floating_point():
        mix = selection.double().to(weight.device)
        return torch.einsum("kn,n...->k...", mix, weight), mix @ bias
    return weight[selection], bias[selection]


@torch.no_grad()
def _set_parameters(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    # a new tensor, not a copy into the old one: a weight tied to another module (an output head tied
    # to the input embedding) must not carry this layer's refit into that module
    layer.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    set_bias(layer, bias)


def _channel_rows(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """(channels, positions) view of a layer input: every spatial position of every image is a sample."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _channel_means(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each input channel's mean over the padded input (padding included), repeated once per kernel
    tap: one value per feature, in the order of the layer's weight rows."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).mean(0)
    return padded_input(layer, x).mean((0, 2, 3)).repeat(layer.weight[0, 0].numel())


def _steps(x: torch.Tensor, bytes_per_sample: int) -> list[slice]:
    step = max(1, _GRAM_CHUNK_BYTES // max(1, bytes_per_sample))
    return [slice(i, i + step) for i in range(0, len(x), step)]


class _InputFit:
    """Input space: new weight = original rows of the kept outputs with the input map M applied, M the
    ridge least-squares map from the pruned input's channels to the original input's."""

    def __init__(self, layer: nn.Module, original: nn.Module, origin: torch.Tensor, pruned_in: torch.Tensor,
                 original_in: torch.Tensor, ridge: float, intercept: bool, why: str = ""):
        self.layer, self.original, self.origin, self.ridge, self.intercept, self.why = \
            layer, original, origin, ridge, intercept, why
        channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        self.k, n = pruned_in.shape[channel_dim], original_in.shape[channel_dim]
        dim = self.k + int(intercept)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=pruned_in.device)
        self.cross = torch.zeros(dim, n, dtype=torch.float64, device=pruned_in.device)
        self.total, self.samples = 0.0, 0

    def add(self, pruned_in: torch.Tensor, original_in: torch.Tensor) -> None:
        per_sample = (self.k + self.cross.shape[1]) * 8 * (pruned_in[0].numel() // max(1, self.k))
        for part in _steps(pruned_in, per_sample):
            a, b = _channel_rows(pruned_in[part], self.layer).double(), _channel_rows(original_in[part], self.layer).double()
            if self.intercept:
                a = torch.cat([a, a.new_ones(1, a.shape[1])])
            self.gram += a @ a.t()
            self.cross += a @ b.t()
            self.total += float((b ** 2).sum())
        self.samples += len(pruned_in)

    def apply(self) -> dict:
        gram, cross, k = self.gram, self.cross, self.k
        mix = _solve(gram, cross, self.ridge, self.intercept)  # dim x n
        # fraction of the original input's energy the map reproduces: 1 - |X - M^T X'|^2 / |X|^2
        residual = self.total - 2 * float((mix * cross).sum()) + float((mix * (gram @ mix)).sum())
        weight, bias = _original_rows(self.original, self.origin)  # out x n x ...
        new_weight = torch.einsum("on...,kn->ok...", weight, mix[:k])
        if self.intercept:
            bias = bias + (weight.flatten(2).sum(2) @ mix[k] if weight.dim() > 2 else weight @ mix[k])
        _set_parameters(self.layer, new_weight, bias)
        return {"mode": "input", "explained": 1.0 - residual / self.total if self.total > 0 else 1.0,
                "samples": self.samples, **({"why": self.why} if self.why else {})}


class _OutputFit:
    """Output space: the weight W' (and bias) minimising |U' W'^T + b - U W^T|^2 + lambda |W' - W0|^2,
    U and U' the patches (one row per output position) the layer reads in the original and the pruned
    model, at a random share of the positions of the samples it reads; W the original rows of the kept
    outputs (or their fused mix), W0 the layer's weight as pruning and fusion left it. The ridge pulls
    towards W0, not towards zero, and the fit is solved for the change W' - W0 from residuals, so a
    layer whose inputs did not change keeps its weights exactly. U W^T is one convolution of the
    original input when every position is read, else the picked positions' patches times W."""

    def __init__(self, layer: nn.Module, original: nn.Module, rows: torch.Tensor, pruned_in: torch.Tensor,
                 ridge: float, intercept: bool, keep: float, generator):
        self.layer, self.ridge, self.intercept = layer, ridge, intercept
        self.keep, self.generator = keep, generator  # fraction of positions kept (an even random draw)
        self.weight, self.bias = _original_rows(original, rows)
        self.current = weight_rows(layer, layer.weight.detach()).clone()  # W0, kept while the layer changes
        self.size = self.current.shape[1]
        self.channels = layer.weight.shape[1]  # input channels (or features) of the layer
        dim = self.size + int(intercept)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=self.current.device)
        self.cross = torch.zeros(dim, len(self.weight), dtype=torch.float64, device=self.current.device)
        self.taps = lag_kernel(layer)  # a long 1-D kernel: Gram matrices from lag correlations, no patches
        width = self.size // self.taps * 3 if self.taps else dim  # floats per position held at once
        self.positions = positions_per_sample(layer, pruned_in)
        self.per_sample = 4 * max(1, round(keep * self.positions)) * (width + 3 * len(self.weight))
        self.total = self.before = 0.0
        self.offset, self.samples = None, 0

    def add(self, pruned_in: torch.Tensor, original_in: torch.Tensor) -> None:
        """Accumulate the sums over one chunk of samples."""
        pruned_in, original_in = samples_of(self.layer, pruned_in), samples_of(self.layer, original_in)
        target_weight = self.weight.to(original_in.dtype)
        for part in _steps(pruned_in, self.per_sample):
            if self.taps:
                self._add_by_lags(pruned_in[part], original_in[part], target_weight)
                continue
            picked = None
            if self.keep < 1:  # an even random draw of the chunk's positions; only their patches are formed
                positions = len(pruned_in[part]) * self.positions
                picked = torch.randperm(positions, generator=self.generator)[:max(1, round(self.keep * positions))]
                picked = picked.to(pruned_in.device)
            shift = None
            if self.intercept:
                # with an intercept, inputs may be measured from any offset: from their mean per channel in
                # the first chunk, the float32 products keep their precision where inputs sit far from zero
                # (e.g. after a ReLU and a BatchNorm shift), the solution no longer depends on how the
                # products are split across threads, and the ridge scales with the inputs' spread, not
                # their offset
                if self.offset is None:
                    self.offset = _channel_means(self.layer, pruned_in[part])
                shift = self.offset[:self.channels]
            a = patch_rows(self.layer, pruned_in[part], picked, shift)  # positions x features, from the offset
            target = output_rows(self.layer, original_in[part], target_weight, picked)  # positions x outputs
            self.total += _squares(target)
            if shift is not None:  # the residual is that of the inputs themselves: a + offset
                target -= self.offset @ self.current.t()
            # products in the layer's precision over one chunk, sums over chunks in float64; the
            # intercept is a constant extra input (its rows of the Gram matrices are sums)
            residual = torch.addmm(target, a, self.current.t(), alpha=-1)
            size = self.size
            _add_lower_gram(self.gram[:size, :size], a)
            self.cross[:size] += (a.t() @ residual).double()
            if self.intercept:
                self.gram[size, :size] += a.sum(0).double()
                self.gram[size, size] += a.shape[0]
                self.cross[size] += residual.sum(0).double()
            self.before += _squares(residual)
        self.samples += len(pruned_in)

    def _add_by_lags(self, pruned_in: torch.Tensor, original_in: torch.Tensor, target_weight: torch.Tensor) -> None:
        """The same sums for a long 1-D kernel, without patches (patches.patch_gram): inputs measured
        from a per-channel offset (the first chunk's mean), residuals from two convolutions, their
        products with the patches as a convolution's weight gradient."""
        padded = padded_input(self.layer, pruned_in)
        shifted = padded
        if self.intercept:
            if self.offset is None:
                self.offset = _channel_means(self.layer, pruned_in)
            # subtracted after padding: padded positions read -offset like every other
            shifted = padded - self.offset[:self.channels].view(1, -1, 1, 1)
        target = convolve(self.layer, original_in, target_weight)
        residual = target - output_map(self.layer, padded, rows_to_weight(self.layer, self.current))
        gram, sums, positions = patch_gram(self.layer, shifted)
        size = self.size
        self.gram[:size, :size] += gram.tril()
        self.cross[:size] += patch_cross(self.layer, shifted, residual).double()
        if self.intercept:
            self.gram[size, :size] += sums
            self.gram[size, size] += positions
            self.cross[size] += residual.sum((0, 2, 3)).double()
        self.total += _squares(target.transpose(0, 1).reshape(len(self.weight), -1).t())
        self.before += _squares(residual.transpose(0, 1).reshape(len(self.weight), -1).t())

    def apply(self) -> dict:
        size, bias = self.size, self.bias
        gram, cross = _mirror_lower(self.gram), self.cross
        change = _solve(gram, cross, self.ridge, self.intercept)  # dim x out
        after = self.before - 2 * float((change * cross).sum()) + float((change * (gram @ change)).sum())
        if self.intercept:  # the intercept was fitted for inputs measured from the offset
            bias = bias + change[-1] - change[:size].t() @ self.offset.double()
        new_weight = self.current.double() + change[:size].t()
        _set_parameters(self.layer, rows_to_weight(self.layer, new_weight), bias)
        return {"mode": "output", "explained": 1.0 - after / self.total if self.total > 0 else 1.0,
                "samples": self.samples}


class _DepthwiseFit:
    """Depthwise conv: each channel reads only itself, so each gets its own scale (and shift)."""

    def __init__(self, layer: nn.Module, original: nn.Module, origin: torch.Tensor, pruned_in: torch.Tensor,
                 ridge: float, intercept: bool):
        self.layer, self.original, self.origin, self.ridge, self.intercept = layer, original, origin, ridge, intercept
        # sum a^2, sum a, sum a*b, sum b, sum b^2 per channel
        self.stats = torch.zeros(5, pruned_in.shape[1], dtype=torch.float64, device=pruned_in.device)
        self.count = self.samples = 0

    def add(self, pruned_in: torch.Tensor, original_in: torch.Tensor) -> None:
        for a, b in zip(pruned_in.split(64), original_in.split(64)):
            a, b = _channel_rows(a, self.layer).double(), _channel_rows(b, self.layer).double()[self.origin]
            self.stats += torch.stack([(a * a).sum(1), a.sum(1), (a * b).sum(1), b.sum(1), (b * b).sum(1)])
            self.count += a.shape[1]
        self.samples += len(pruned_in)

    def apply(self) -> dict:
        saa, sa, sab, sb, sbb = self.stats
        count = self.count
        lam = self.ridge * saa.mean().clamp_min(1e-12)
        # ridge towards scale 1 (the original rows), as in _solve
        if self.intercept:  # solve [[saa + lam, sa], [sa, count]] [s, c] = [sab + lam, sb] per channel
            det = (saa + lam) * count - sa ** 2
            scale = torch.where(det > 0, ((sab + lam) * count - sa * sb) / det.clamp_min(1e-300), torch.ones_like(saa))
            shift = (sb - scale * sa) / count
        else:
            scale, shift = (sab + lam) / (saa + lam), torch.zeros_like(saa)
        residual = sbb - 2 * (scale * sab + shift * sb) + scale ** 2 * saa + 2 * scale * shift * sa + shift ** 2 * count
        weight, bias = _original_rows(self.original, self.origin)
        bias = bias + weight.flatten(1).sum(1) * shift
        _set_parameters(self.layer, weight * scale.view((-1,) + (1,) * (weight.dim() - 1)), bias)
        return {"mode": "per_channel", "samples": self.samples,
                "explained": 1.0 - float(residual.sum() / sbb.sum()) if float(sbb.sum()) > 0 else 1.0}


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and \
        layer.groups == layer.in_channels == layer.out_channels


def fused_row_maps(original: nn.Module, results) -> dict[str, torch.Tensor]:
    """For each producer of a fused group: the k x n map that made its kept rows from its original
    rows (given to repair_by_reconstruction, the refit then aims at the fused channels instead of the
    original channels that were kept). Layers pruned more than once are left out."""
    modules, maps = dict(original.named_modules()), {}
    for result in results:
        if result.producer_map is None:
            continue
        for name in result.producers:
            if name in modules and out_channels(modules[name]) == result.channels:
                maps[name] = result.producer_map
    return maps


def _output_fit_samples(layer: nn.Module, per_sample: int, count: int, allowance: float,
                        memory_budget: int | None) -> tuple[int, float, str]:
    """How many of `count` samples (of `per_sample` output positions each) the output-space fit of
    `layer` reads and the fraction of their positions it keeps, chosen so that its cost is bounded by
    design: building the Gram matrix (features^2 multiply-adds per position, or features^2 / K for a
    long 1-D kernel of K taps) and solving it may take at most `allowance`, and its matrices must fit
    in `memory_budget` bytes. Returns (0, 0, why) when that leaves fewer
    than RECONSTRUCT_MIN_POSITIONS positions per feature: the layer then gets the input-space channel
    map instead (its features are channels, not channels x kernel)."""
    size, taps = layer.weight[0].numel() + 1, lag_kernel(layer)
    total = count * per_sample
    per_position = size * size / max(1, taps)  # multiply-adds of the Gram matrix per position
    gram_bytes = 3 * size * size * 8  # the Gram matrix, the regularised system and its factor, float64
    if memory_budget is not None and gram_bytes > memory_budget:
        return 0, 0.0, f"its {size}^2 Gram matrices ({gram_bytes / 2 ** 20:.0f} MiB) exceed memory_budget"
    positions = int(min(total, RECONSTRUCT_POSITIONS, RECONSTRUCT_POSITIONS_PER_FEATURE * size,
                        (allowance - size ** 3 / 3) / per_position))
    if positions < min(total, RECONSTRUCT_MIN_POSITIONS * size):
        return 0, 0.0, f"an output-space fit over {size} features exceeds the cost allowance"
    samples = min(count, max(-(-positions // per_sample), RECONSTRUCT_MIN_SAMPLES))
    keep = 1.0 if taps else min(1.0, positions / (samples * per_sample))  # lags read every position
    return samples, keep, ""


def check_reconstruct_options(batch_size=None, memory_budget=None, cost: float = RECONSTRUCT_COST,
                              samples: int | None = None) -> None:
    """One-line errors for options the reconstruction cannot use (before any work); `samples`: how many
    calibration samples it will read, if known."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer (samples per forward pass) or None, got {batch_size!r}")
    if batch_size is not None and samples is not None and -(-samples // batch_size) > MAX_CHUNKS:
        raise ValueError(f"batch_size {batch_size} cuts {samples} calibration samples into more than {MAX_CHUNKS} "
                         f"chunks (each runs in its own threads): use batch_size >= {-(-samples // MAX_CHUNKS)}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
                                      or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost > 0:
        raise ValueError(f"cost must be a positive number (float('inf'): no limit), got {cost!r}")


class _Layout:
    """What one sample's run of the original tells about the layers: their run order (layers that never
    run are left out), the multiply-adds each computes per sample and its output positions per sample."""

    def __init__(self, model: nn.Module, names: list[str], example: torch.Tensor):
        modules = dict(model.named_modules())
        self.order: list[str] = []
        self.macs: dict[str, int] = {}
        self.positions: dict[str, int] = {}
        handles = [modules[name].register_forward_pre_hook(self._enter(name), with_kwargs=True) for name in names] + \
            [modules[name].register_forward_hook(self._leave(name)) for name in names]
        try:
            run_model(model, example)
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, name):
        def hook(layer, args, kwargs):
            if name not in self.order:
                self.order.append(name)
                if isinstance(layer, PATCH_TYPES):
                    self.positions[name] = positions_per_sample(layer, args[0] if args else next(iter(kwargs.values())))
        return hook

    def _leave(self, name):
        def hook(layer, _, output):
            if name not in self.macs and isinstance(output, torch.Tensor):
                self.macs[name] = output.numel() // len(output) * layer.weight[0].numel()
        return hook


class _Pauses:
    """Pre-hooks on a model's named layers that pause whichever chunk run (a _ChunkRun thread) reaches
    one; other callers (the main thread) pass through."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.runs: dict[int, _ChunkRun] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_pre_hook(self._pause(name), with_kwargs=True)
                        for name in names]

    def _pause(self, name):
        def hook(_, args, kwargs):
            run = self.runs.get(threading.get_ident())
            if run is not None:
                run.reached(name, args[0] if args else next(iter(kwargs.values())))
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class _ChunkRun:
    """One model running on one chunk of the calibration samples in a worker thread, paused just before the
    first call of each named layer: the scheduler reads the layer's input there, then lets it go on or
    stops it. Only one run computes at a time (the scheduler waits for it): two models computing at once
    on one thread pool gave non-finite results now and then, and are not faster on few cores."""

    def __init__(self, model: nn.Module, pauses: _Pauses, order: list[str], inputs, label: str):
        self.order, self.label, self.index, self.error = order, label, -1, None
        self.handoff, self.resume = queue.Queue(maxsize=1), queue.Queue()
        self.seen: set[str] = set()
        self.thread = threading.Thread(target=self._work, args=(model, pauses, inputs), daemon=True)
        self.thread.start()
        self.at, self.tensor = self.handoff.get()  # paused before its first named layer (None: it ended)

    def _work(self, model, pauses, inputs):
        pauses.runs[threading.get_ident()] = self
        try:
            with torch.no_grad():
                run_model(model, inputs)
        except _Stop:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the scheduler's thread
            self.error = error
        finally:
            del pauses.runs[threading.get_ident()]
            self.handoff.put((None, None))

    def reached(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:  # a layer called again in the same forward runs as it is
            return
        self.seen.add(name)
        self.handoff.put((name, tensor))
        if self.resume.get():
            raise _Stop

    def input_of(self, name: str) -> torch.Tensor:
        """Let the run go on until it is paused before `name` (every named layer before it, already
        refitted, runs); the layer's input there."""
        target = self.order.index(name)
        while self.index < target:
            if self.at is not None and self.index >= 0:
                self.resume.put(False)
                self.at, self.tensor = self.handoff.get()
            self.index += 1
            expected = self.order[self.index]
            if self.at is None:
                if self.error is not None:  # the model's own error, as if it had run in this thread
                    raise self.error
                raise RuntimeError(f"the {self.label} model stopped before layer {expected}")
            if self.at != expected:
                raise RuntimeError(f"layer order differs between the models: the original runs {expected} "
                                   f"next, the {self.label} model runs {self.at}")
        return self.tensor

    def stop(self) -> None:
        """End the run where it is paused and wait for its thread."""
        while self.at is not None:
            self.resume.put(True)
            self.at, self.tensor = self.handoff.get()
        self.thread.join()


def _libc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def _return_freed_memory() -> None:
    """Hand the memory of freed activations back to the system: glibc keeps it in the heap of the thread
    that freed it, and with a thread per chunk the process held every chunk's largest activations at
    once (ResNet18, 4 chunks of 256: +1.6 GiB peak, +0.7 GiB with this)."""
    if _TRIM is not None:
        _TRIM(0)


@torch.no_grad()
def repair_by_reconstruction(original: nn.Module, pruned: nn.Module, channel_origin: dict[str, torch.Tensor],
                             inputs, ridge: float = RECONSTRUCT_RIDGE, intercept: bool = True,
                             space: str = "output", skip=(), seed: int = 0,
                             row_maps: dict[str, torch.Tensor] | None = None, cost: float = RECONSTRUCT_COST,
                             memory_budget: int | None = None, batch_size: int | None = None) -> dict[str, dict]:
    """Refit every Conv/Linear layer of `pruned` (in place) so that, from the pruned model's own inputs,
    it reproduces what the same layer of `original` outputs for the channels it keeps. `inputs`: the
    calibration batch, a tensor or a tuple/dict of tensors sharing the sample dimension (token ids with
    an attention mask), run as model(x), model(*x) or model(**x).

    space="output" (default): the weight W' and bias minimising |W' U' + b - W U|^2 + lambda |W' - W0|^2
    over sampled output positions, U / U' the patches the layer reads in the original / pruned model,
    W the original rows of the channels it keeps (`channel_origin`; or, per layer in `row_maps`, a
    k x n mix of original rows, e.g. fused_row_maps), W0 the layer as pruning left it. space="input":
    the cheaper channel map M minimising |X - M^T X'|^2 + lambda |M|^2 on the layer inputs, applied to
    the input side of W (the data-driven counterpart of a transport map); it is also what an output-space
    layer falls back to when its fit would cost more than `cost` x (its multiply-adds on the inputs + an
    even share of the model's; float("inf"): never) or its Gram matrices exceed `memory_budget` bytes.
    Layers are refitted in run order, each before it runs, so its corrected output feeds the next. The
    samples, shuffled, run in chunks of `batch_size` (None: RECONSTRUCT_BATCH), each chunk through both
    models in worker threads that pause before every layer; a layer is refitted from as many chunks as
    the samples it reads (a random part of the last), the chunks then run on through it: every sample
    runs through each model once, and memory is set by one chunk's activations plus what waiting chunks
    hold at deeper, smaller layers. Depthwise convolutions get a scale and shift per channel; other
    grouped convolutions and the layers in `skip` are left as they are.
    Returns, per layer, how it was refitted, how many samples it read and the fraction of its target's
    energy the fit explains (and, for a layer that fell back to the input space, why).
    """
    check_choice(space, RECONSTRUCT_SPACES, "reconstruction space")
    generator = torch.Generator().manual_seed(seed)
    layers = {name: module for name, module in pruned.named_modules() if isinstance(module, ROOT_TYPES)}
    reference = dict(original.named_modules())
    names = [name for name in layers if name not in skip and name in reference]
    count = batch_length(inputs)
    batch = min(batch_size or RECONSTRUCT_BATCH, count)
    check_reconstruct_options(batch_size, memory_budget, cost, count)
    # channels_last: oneDNN's fastest CPU convolutions; the samples shuffled, so that the first ones
    # (all a layer that reads few of them sees) are a random choice
    order = torch.randperm(count, generator=generator)
    inputs = map_tensors(take(inputs, order), lambda t: as_fast_input(t, t.device))
    chunks = [take(inputs, slice(start, start + batch)) for start in range(0, count, batch)]
    report: dict[str, dict] = {}
    with eval_mode(original), eval_mode(pruned), fast_layout(original), fast_layout(pruned):
        layout = _Layout(original, names, take(inputs, slice(0, 1)))
        share = sum(layout.macs.values()) / max(1, len(layout.order))

        def plan(name: str, layer: nn.Module) -> tuple[str, int, str]:
            """(kind, samples of the calibration set, detail): kind "skip", "per_channel", "input" (detail:
            why, for a fallback) or "output" (detail: the fraction of the samples' positions it keeps)."""
            if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1:
                return ("per_channel", batch, "") if _is_depthwise(layer) else ("skip", 0, "")
            if space == "output" and isinstance(layer, PATCH_TYPES):
                allowance = max(_FREE_MACS, cost * count * (layout.macs.get(name, 0) + share))
                samples, keep, why = _output_fit_samples(layer, layout.positions[name], count, allowance, memory_budget)
                return ("output", samples, keep) if samples else ("input", batch, why)
            return "input", batch, ""

        def make(name: str, layer: nn.Module, kind: str, detail, pruned_in, original_in):
            origin = channel_origin.get(name, torch.arange(out_channels(layer)))
            rows = (row_maps or {}).get(name, origin)
            if kind == "per_channel":
                return _DepthwiseFit(layer, reference[name], origin, pruned_in, ridge, intercept)
            if kind == "input":
                return _InputFit(layer, reference[name], rows, pruned_in, original_in, ridge, intercept, detail)
            return _OutputFit(layer, reference[name], rows, pruned_in, ridge, intercept, detail, generator)

        pauses = [_Pauses(original, layout.order), _Pauses(pruned, layout.order)]
        runs: list[tuple[_ChunkRun, _ChunkRun]] = []  # (pruned, original) per chunk started so far
        last = 0  # the chunk that ran last
        try:
            for name in layout.order:
                kind, samples, detail = plan(name, layers[name])
                if kind == "skip":
                    report[name] = {"mode": "skipped (grouped convolution)"}
                    continue
                fit, pending, needed = None, [], -(-samples // batch)
                for index in range(needed):
                    if index == len(runs):
                        runs.append((_ChunkRun(pruned, pauses[1], layout.order, chunks[index], "pruned"),
                                     _ChunkRun(original, pauses[0], layout.order, chunks[index], "original")))
                    if index != last:  # what the runs freed so far, held in their threads' heaps
                        _return_freed_memory()
                        last = index
                    pruned_run, original_run = runs[index]
                    pruned_in, original_in = pruned_run.input_of(name), original_run.input_of(name)
                    wanted = samples - index * batch  # the last chunk a layer reads may be read in part:
                    if wanted < batch_length(pruned_in):  # a random part, another for each layer
                        part = torch.randperm(batch_length(pruned_in), generator=generator)[:wanted].sort().values
                        part = part.to(pruned_in.device)
                        pruned_in, original_in = pruned_in[part], original_in[part]
                    fit = fit or make(name, layers[name], kind, detail, pruned_in, original_in)
                    # small inputs (deep layers) of several chunks are added at once: fewer, larger products
                    pending.append((pruned_in, original_in))
                    if index == needed - 1 or sum(_bytes(pair) for pair in pending) >= _GRAM_CHUNK_BYTES:
                        fit.add(*(torch.cat(side) if len(pending) > 1 else side[0] for side in zip(*pending)))
                        pending = []
                    del pruned_in, original_in
                report[name] = fit.apply()
        finally:
            for pruned_run, original_run in runs:
                pruned_run.stop()
                original_run.stop()
            for hooks in pauses:
                hooks.close()
            _return_freed_memory()
    return report
