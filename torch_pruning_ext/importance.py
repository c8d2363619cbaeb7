"""Importance criteria by name, plus any torch-pruning Importance object.

The magnitude criteria (l1, l2, linf) score a channel as in the released code: its weight rows
(out-channels) and columns (in-channels) in every Conv/Linear member of the group, averaged over the
members and divided by the mean over channels; BatchNorm members do not count.

The data-driven criteria (DATA_CRITERIA: taylor, chip, taylor_fm, thinet) implement
``prepare(model, group, batches)``, which the pruner calls right before scoring each group, so the
scores see the model as already pruned so far (gate implements it too, only to learn layer names).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch_pruning.pruner import function as fn

from .modes import eval_mode
from .inputs import map_tensors, run_model, tensors_of

CRITERIA = ("l1", "l2", "linf", "taylor", "lamp", "random", "chip", "taylor_fm", "thinet", "gate")
DATA_CRITERIA = ("taylor", "chip", "taylor_fm", "thinet")  # these need calibration batches
THINET_SAMPLES = 1024  # ThiNet's default number of sampled outputs per consuming layer
_WEIGHTED = [nn.modules.conv._ConvNd, nn.Linear]


class RandomImportance(tp.importance.Importance):
    """Uniform random scores from torch's generator, so torch.manual_seed repeats them (torch-pruning
    1.6.0's own RandomImportance shuffles with Python's `random`, which torch's seed does not fix)."""

    @torch.no_grad()
    def __call__(self, group, **kwargs):
        return torch.rand(len(group[0].idxs))


class LinfImportance(tp.importance.GroupMagnitudeImportance):
    """Largest absolute weight of each channel's rows/columns, averaged over members, / mean."""

    def __init__(self):
        super().__init__(p=1, group_reduction="mean", normalizer="mean", target_types=_WEIGHTED)

    @torch.no_grad()
    def __call__(self, group):
        scores, roots = [], []
        for item in group.items:
            layer, prune_fn = item.dep.layer, item.dep.pruning_fn
            if not isinstance(layer, tuple(self.target_types)) or getattr(layer, "transposed", False):
                continue
            if prune_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
                scores.append(layer.weight.data[item.idxs].flatten(1).abs().amax(1))
            elif prune_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels):
                columns = layer.weight.data.transpose(0, 1).flatten(1).abs().amax(1)
                if prune_fn == fn.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
                    columns = columns.repeat(layer.groups)
                scores.append(columns[item.idxs])
            else:
                continue
            roots.append(item.root_idxs)
        if not scores:
            return None
        return self._normalize(self._reduce(scores, roots), self.normalizer)


class TaylorImportance(tp.importance.GroupTaylorImportance):
    """|w * dL/dw| with gradients accumulated over calibration batches, model in eval mode."""
    needs_data = True
    loss = None  # loss(outputs, inputs, labels) -> scalar; None: cross-entropy against the labels

    def __init__(self):
        super().__init__(group_reduction="mean", normalizer="mean", target_types=_WEIGHTED)

    def prepare(self, model: nn.Module, group, batches) -> None:
        model.zero_grad(set_to_none=True)
        _run_batches(model, batches, with_grad=True, loss=self.loss)

    def __call__(self, group):
        for item in group.items:
            layer = item.dep.layer
            if isinstance(layer, tuple(self.target_types)) and layer.weight.grad is None:
                raise RuntimeError("taylor importance needs gradients: pass calibration batches")
        return super().__call__(group)


class ChipImportance(tp.importance.Importance):
    """Channel independence (CHIP, Sui et al. 2021) of the group's output feature maps.

    For each image, a channel's score is how much the nuclear norm of the (channels x pixels)
    feature-map matrix drops when that channel's row is zeroed; scores are averaged over the
    calibration images and over the group's producing layers.
    """
    needs_data = True

    def __init__(self):
        self._scores: torch.Tensor | None = None

    @torch.no_grad()
    def prepare(self, model: nn.Module, group, batches) -> None:
        producers = [(item.dep.layer, item.root_idxs, item.idxs) for item in group.items
                     if item.dep.pruning_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels)]
        n = len(group[0].idxs)
        maps: dict[nn.Module, list[torch.Tensor]] = {layer: [] for layer, _, _ in producers}
        hooks = [layer.register_forward_hook(lambda m, i, o: maps[m].append(o.detach().float().cpu()))
                 for layer in maps]
        try:
            _run_batches(model, batches, with_grad=False)
        finally:
            for hook in hooks:
                hook.remove()
        total, count = torch.zeros(n, dtype=torch.float64), 0
        for layer, roots, idxs in producers:
            outputs = torch.cat(maps[layer])[:, idxs]
            features = outputs.flatten(2) if outputs.dim() > 2 else outputs.unsqueeze(-1)
            total.index_add_(0, torch.tensor(roots), channel_independence(features))
            count += 1
        self._scores = (total / max(count, 1)).float()

    def __call__(self, group):
        if self._scores is None:
            raise RuntimeError("chip importance needs feature maps: pass calibration batches")
        scores, self._scores = self._scores, None
        return scores


def _producers(group):
    return [item for item in group.items
            if item.dep.pruning_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels)]


def _run_batches(model: nn.Module, batches, with_grad: bool, loss=None) -> None:
    """Run the (inputs, labels) batches; with_grad: back-propagate loss(outputs, inputs, labels), by
    default the cross-entropy of the model's first output (logits per sample, or per token: (batch,
    tokens, classes) against (batch, tokens))."""
    device = next(model.parameters()).device
    with eval_mode(model):
        for inputs, labels in batches:
            inputs = map_tensors(inputs, lambda t: t.to(device))
            if with_grad:
                outputs = run_model(model, inputs)
                if loss is not None:
                    loss(outputs, inputs, labels.to(device) if labels is not None else None).backward()
                    continue
                logits = tensors_of(outputs)[0]
                F.cross_entropy(logits.flatten(0, -2), labels.to(device).flatten()).backward()
            else:
                with torch.no_grad():
                    run_model(model, inputs)


class FeatureMapTaylorImportance(tp.importance.Importance):
    """Feature-map Taylor expansion (Molchanov et al., ICLR 2017).

    Per channel: |spatial mean of activation x gradient| per sample, averaged over the calibration
    batches, L2-normalised per producing layer; a residual group averages its producers.
    """
    needs_data = True
    loss = None  # as for TaylorImportance

    def __init__(self):
        self._scores: torch.Tensor | None = None

    def prepare(self, model: nn.Module, group, batches) -> None:
        producers = _producers(group)
        totals = {id(item): torch.zeros(item.dep.layer.weight.shape[0], dtype=torch.float64) for item in producers}
        counts = {id(item): 0 for item in producers}
        handles = []

        def forward_hook(item):
            def hook(_, __, output):
                def on_grad(grad):
                    product = (output.detach() * grad).double()
                    per_sample = product.flatten(2).mean(2) if product.dim() > 2 else product
                    totals[id(item)].add_(per_sample.abs().sum(0).cpu())
                    counts[id(item)] += per_sample.shape[0]
                output.register_hook(on_grad)
            return hook

        for item in producers:
            handles.append(item.dep.layer.register_forward_hook(forward_hook(item)))
        try:
            _run_batches(model, batches, with_grad=True, loss=self.loss)
        finally:
            for handle in handles:
                handle.remove()
            model.zero_grad(set_to_none=True)
        n = len(group[0].idxs)
        scores = torch.zeros(n, dtype=torch.float64)
        for item in producers:
            layer_scores = totals[id(item)] / max(counts[id(item)], 1)
            layer_scores = layer_scores / layer_scores.norm().clamp_min(1e-12)
            scores.index_add_(0, torch.tensor(item.root_idxs), layer_scores[item.idxs])
        self._scores = (scores / max(len(producers), 1)).float()

    def __call__(self, group):
        if self._scores is None:
            raise RuntimeError("taylor_fm importance needs gradients of feature maps: pass calibration batches")
        scores, self._scores = self._scores, None
        return scores


class ThiNetImportance(tp.importance.Importance):
    """ThiNet (Luo et al., ICCV 2017): greedily remove the channels whose contribution to sampled
    outputs of the next layer(s) is smallest in sum; the removal order is the importance.

    samples: number of (image, output channel, location) samples per consuming layer.
    """
    needs_data = True

    def __init__(self, samples: int = THINET_SAMPLES, seed: int = 0):
        if samples < 1:
            raise ValueError(f"thinet samples must be a positive integer, got {samples!r}")
        self.samples, self.seed = samples, seed
        self._scores: torch.Tensor | None = None

    def prepare(self, model: nn.Module, group, batches) -> None:
        n = len(group[0].idxs)
        consumers = [item for item in group.items
                     if item.dep.pruning_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels)
                     and getattr(item.dep.layer, "groups", 1) == 1]
        inputs = {id(item): [] for item in consumers}
        handles = [item.dep.layer.register_forward_pre_hook(
            lambda m, args, item=item: inputs[id(item)].append(args[0].detach().cpu())) for item in consumers]
        try:
            _run_batches(model, batches, with_grad=False)
        finally:
            for handle in handles:
                handle.remove()
        generator = torch.Generator().manual_seed(self.seed)
        parts = [self._contributions(item, torch.cat(inputs[id(item)]), n, generator) for item in consumers]
        if not parts:
            raise ValueError("thinet needs a Conv/Linear layer that consumes the group's channels")
        self._scores = greedy_removal_order(torch.cat(parts, dim=0))

    def _contributions(self, item, x: torch.Tensor, n: int, generator) -> torch.Tensor:
        """(samples, n): what each group channel adds to a sampled output value of the consumer."""
        layer = item.dep.layer
        weight = layer.weight.detach().double().cpu()
        roots = torch.tensor(item.root_idxs)
        positions = torch.tensor(item.idxs)
        count = self.samples
        images = torch.randint(0, x.shape[0], (count,), generator=generator)
        outputs = torch.randint(0, weight.shape[0], (count,), generator=generator)
        if isinstance(layer, nn.Linear):
            per_input = weight[outputs] * x.flatten(1)[images].double()  # (samples, in_features)
        else:
            per_input = (sample_patches(layer, x, images, generator) * weight[outputs]).flatten(2).sum(2)
        result = torch.zeros(count, n, dtype=torch.float64)
        result.index_add_(1, roots, per_input[:, positions])
        return result

    def __call__(self, group):
        if self._scores is None:
            raise RuntimeError("thinet importance needs activations: pass calibration batches")
        scores, self._scores = self._scores, None
        return scores


def sample_patches(layer: nn.Module, x: torch.Tensor, images: torch.Tensor, generator) -> torch.Tensor:
    """The input patch (C, kh, kw) under one random output location of `layer`, per sampled image."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    if isinstance(layer.padding, str):
        raise ValueError(f"thinet does not support padding={layer.padding!r}")
    ph, pw = layer.padding
    padded = F.pad(x, (pw, pw, ph, ph))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    count = len(images)
    ys = torch.randint(0, out_h, (count, 1), generator=generator) * sh + torch.arange(kh) * dh
    xs = torch.randint(0, out_w, (count, 1), generator=generator) * sw + torch.arange(kw) * dw
    patches = padded[images[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # (count, kh, kw, C)
    return patches.permute(0, 3, 1, 2).double()


def greedy_removal_order(contributions: torch.Tensor) -> torch.Tensor:
    """Score channels by ThiNet's greedy order: the channel whose removal adds least to the squared
    reconstruction error goes first (score 0), the last one left scores n-1."""
    samples, n = contributions.shape
    removed_sum = torch.zeros(samples, dtype=contributions.dtype)
    remaining = torch.ones(n, dtype=torch.bool)
    scores = torch.empty(n)
    for rank in range(n):
        errors = ((removed_sum.unsqueeze(1) + contributions) ** 2).sum(0)
        errors[~remaining] = float("inf")
        choice = int(errors.argmin())
        scores[choice] = rank
        remaining[choice] = False
        removed_sum += contributions[:, choice]
    return scores


def channel_independence(features: torch.Tensor) -> torch.Tensor:
    """Mean over images of ||A||_* - ||A with row c zeroed||_* for feature maps A (N, C, pixels)."""
    _, channels, _ = features.shape
    keep = 1.0 - torch.eye(channels, dtype=torch.float64)
    total = torch.zeros(channels, dtype=torch.float64)
    for image in features.double():
        full = torch.linalg.svdvals(image).sum()
        masked = torch.linalg.svdvals(keep.unsqueeze(-1) * image.unsqueeze(0)).sum(dim=1)
        total += full - masked
    return total / features.shape[0]


class GateImportance(tp.importance.Importance):
    """Channel gates learned by gated training (sparse_training.add_gates): a group's score is the
    mean gate value of its producing layers' channels."""

    def __init__(self, gates: dict[str, torch.Tensor]):
        if not gates:
            raise ValueError("importance 'gate' needs a checkpoint trained with channel gates "
                             "(scripts/train_sparse.py gates); this one has none")
        self.gates = {name: value.detach().float().flatten() for name, value in gates.items()}
        self._names: dict[nn.Module, str] = {}

    def prepare(self, model: nn.Module, group, batches) -> None:
        self._names = {module: name for name, module in model.named_modules()}

    def __call__(self, group):
        n = len(group[0].idxs)
        total, count = torch.zeros(n), 0
        for item in _producers(group):
            name = self._names.get(item.dep.layer)
            gates = self.gates.get(name)
            if gates is None or len(gates) != item.dep.layer.weight.shape[0]:
                continue
            total.index_add_(0, torch.tensor(item.root_idxs), gates[item.idxs])
            count += 1
        if count == 0:
            raise ValueError("no learned channel gates for the layers of this group")
        return total / count


GRADIENT_CRITERIA = ("taylor", "taylor_fm")  # these back-propagate a loss (see `loss`)


def build_importance(criterion, gates: dict | None = None, thinet_samples: int | None = None,
                     loss=None) -> tp.importance.Importance:
    """An importance object for a criterion name, or the torch-pruning Importance given.

    gates: the learned channel gates of a gated checkpoint, for the criterion "gate".
    thinet_samples: ThiNet's sample count (None: THINET_SAMPLES).
    loss: for the gradient criteria, loss(outputs, inputs, labels) -> scalar tensor back-propagated
    instead of the cross-entropy (e.g. a language model's next-token loss; labels may be None).
    """
    if loss is not None:
        if not callable(loss):
            raise TypeError(f"loss must be a function (outputs, inputs, labels) -> scalar tensor, got "
                            f"{type(loss).__name__}")
        if criterion not in GRADIENT_CRITERIA:
            raise ValueError(f"loss is back-propagated by the gradient criteria ({', '.join(GRADIENT_CRITERIA)}) "
                             f"only, not by importance {criterion!r}")
        importance = build_importance(criterion, gates, thinet_samples)
        importance.loss = loss
        return importance
    if isinstance(criterion, tp.importance.Importance):
        return criterion
    if criterion == "gate":
        return GateImportance(gates or {})
    builders = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="mean",
                                                             target_types=_WEIGHTED),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean",
                                                             target_types=_WEIGHTED),
        "linf": LinfImportance,
        "taylor": TaylorImportance,
        "lamp": tp.importance.LAMPImportance,
        "random": RandomImportance,
        "chip": ChipImportance,
        "taylor_fm": FeatureMapTaylorImportance,
        "thinet": lambda: ThiNetImportance(THINET_SAMPLES if thinet_samples is None else thinet_samples),
    }
    if criterion not in builders:
        raise ValueError(f"unknown importance criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}, "
                         "or pass a torch_pruning.importance.Importance object")
    return builders[criterion]()


def needs_data(importance) -> bool:
    return bool(getattr(importance, "needs_data", False))
