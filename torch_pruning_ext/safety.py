"""Never hand back a broken model: what torch-pruning cannot see, checked before anything changes.

torch-pruning follows channels through the operations it traced, not through what forward() does
with plain Python values. Two things break models it did not anticipate:
- a permute (or transpose) before a flatten: torch-pruning assumes channel-major order and removes
  the wrong inputs of the consumer, so the pruned model runs but computes something else.
  `probe_mapping` perturbs the group's channels at their producers and watches which inputs of each
  consumer move: they must be exactly the ones torch-pruning would remove with those channels.
- a width stored in an attribute (`x.reshape(-1, self.in_features)`): `record_forward` records the
  integer attributes forward() reads, `sync_attributes` updates one when the width it equals changed
  to a single new value, and `breaking_groups` prunes copies to find the groups that would still
  break the forward.
Whatever is left, `check_outputs` refuses: the pruned model must give outputs of the same structure
and shapes as the original on the example inputs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as F

from .groups import ROOT_TYPES, full_group, out_channels, trace_graph
from .inputs import first_line, run_hooked, run_model, shape_text, signature
from .modes import eval_mode

_OUT_FNS = {F.prune_conv_out_channels, F.prune_linear_out_channels, F.prune_depthwise_conv_out_channels}
_IN_FNS = {F.prune_conv_in_channels, F.prune_linear_in_channels}
_REORDERING_GRAD_FNS = ("Permute", "Transpose", "PixelShuffle", "PixelUnshuffle", "ChannelShuffle")
_WIDTH_ATTRIBUTES = ("in_channels", "out_channels", "in_features", "out_features", "num_features",
                     "embed_dim", "num_channels")


def _reorders(module) -> str | None:
    """The name of a traced operation that moves channels around (a reshape, or a permute), if it is one."""
    if isinstance(module, tp.ops._ReshapeOp):
        return "reshape"
    if isinstance(module, tp.ops._ElementWiseOp):
        grad_fn = str(getattr(module, "_grad_fn", ""))
        if any(name in grad_fn for name in _REORDERING_GRAD_FNS):
            return grad_fn.replace("Backward0", "").lower()
    return None


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _per_feature(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """(features, everything else) view with the channel dimension first."""
    return tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1)


@torch.no_grad()
def probe_mapping(model: nn.Module, group, example_inputs, names: dict) -> str | None:
    """None when torch-pruning removes, with each channel of `group`, the consumer inputs that really
    carry it; else the reason pruning the group would change what the kept channels compute.

    Only groups whose channels pass a reshape or a permute are probed (elsewhere the mapping is the
    identity); each probe costs about 2 log2(channels) forward passes of the example inputs, during
    which LayerNorm and GroupNorm pass their input through (they would spread a change to every channel).
    """
    reorders = sorted({r for r in (_reorders(item.dep.target.module) for item in group.items) if r})
    if not reorders:
        return None
    n = len(group[0].idxs)
    producers = [(item.dep.target.module, item) for item in group.items
                 if item.dep.handler in _OUT_FNS and isinstance(item.dep.target.module, ROOT_TYPES)]
    consumers = [(item.dep.target.module, item) for item in group.items
                 if item.dep.handler in _IN_FNS and isinstance(item.dep.target.module, ROOT_TYPES)]
    if not producers or not consumers:
        return None
    captured, clean, perturbed = {}, {}, set()

    def perturb(layer, item):
        positions = torch.tensor([int(i) for i, r in zip(item.idxs, item.root_idxs) if r in perturbed],
                                 dtype=torch.long)

        def hook(_, __, output):
            if layer not in clean:  # the clean pass: remember what the producer gives
                clean[layer] = output.detach().clone()
                return output
            # perturbed passes start from the clean output, so a perturbation that reaches this producer
            # through another layer (a residual stream) does not spread to every channel
            moved = clean[layer].movedim(_channel_dim(layer), 0).clone()
            moved[positions] += 1.0 + 4.0 * clean[layer].float().std().nan_to_num()
            return moved.movedim(0, _channel_dim(layer))
        return hook

    def capture(layer):
        def hook(_, args):
            captured[layer] = _per_feature(args[0].detach().double(), _channel_dim(layer))
        return hook

    def run(channels: set[int]) -> dict:
        perturbed.clear()
        perturbed.update(channels)
        handles = [layer.register_forward_hook(perturb(layer, item)) for layer, item in producers]
        handles += [layer.register_forward_pre_hook(capture(layer)) for layer, _ in consumers]
        # a norm over the channels spreads any change to all of them: pass channels through unchanged
        handles += [norm.register_forward_hook(lambda _, args, __: args[0]) for norm in model.modules()
                    if isinstance(norm, (nn.LayerNorm, nn.GroupNorm))]
        run_hooked(model, example_inputs, handles)
        return dict(captured)

    base = run(set())

    def changed(moved: dict) -> dict:
        return {layer: ((x - base[layer]).abs() > 1e-5 * (1.0 + base[layer].abs().max())).any(dim=1)
                for layer, x in moved.items()}
    # channel c has the code c + 1; each bit is probed twice, moving the channels where it is set and
    # then the others: an input that carries one channel moves in exactly one of the two passes. One
    # that moves in both (a channel-mixing layer such as attention sits on the way) or in neither
    # says nothing; one that moves in the pass its channel is not in contradicts torch-pruning's map.
    for bit in range(max(1, n.bit_length())):
        ones = {c for c in range(n) if (c + 1) >> bit & 1}
        with_bit, without_bit = changed(run(ones)), changed(run(set(range(n)) - ones))
        for layer, item in consumers:
            if layer not in with_bit:
                continue
            for idx, root in zip(item.idxs, item.root_idxs):
                if root is None:
                    continue
                expected = (int(root) + 1) >> bit & 1
                moved_with, moved_without = bool(with_bit[layer][int(idx)]), bool(without_bit[layer][int(idx)])
                if moved_with != moved_without and moved_with != bool(expected):
                    return (f"torch-pruning maps its channels through {', '.join(reorders)} onto the wrong "
                            f"inputs of {names.get(layer, type(layer).__name__)} (input {int(idx)} does not "
                            f"carry channel {int(root)})")
    return None


def layer_widths(model: nn.Module) -> dict[tuple[str, str], int]:
    """(module name, attribute) -> value of every width attribute of torch's own layers (the ones
    torch-pruning updates)."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, _LAYERS):
            continue
        for attribute in _WIDTH_ATTRIBUTES:
            value = module.__dict__.get(attribute)
            if isinstance(value, int) and not isinstance(value, bool):
                found[(name, attribute)] = value
        if isinstance(module, nn.LayerNorm) and module.normalized_shape:
            found[(name, "normalized_shape")] = module.normalized_shape[-1]
    return found


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
           nn.MultiheadAttention, nn.Embedding, nn.PReLU)


def _foreign(module: nn.Module) -> bool:
    """Modules that are not torch's layers (or subclasses of them): torch-pruning does not update
    their integer attributes."""
    return not isinstance(module, _LAYERS) and not type(module).__module__.startswith("torch.")


_WATCHING: dict[type, type] = {}


def _watching_class(cls: type) -> type:
    """A subclass of `cls` that reports reads of its integer attributes (swapped in for one forward);
    TypeError when `cls` cannot be subclassed that way."""
    if cls not in _WATCHING:
        def __getattribute__(self, name):
            value = super(watching, self).__getattribute__(name)
            reads = object.__getattribute__(self, "__dict__").get("_tpx_reads")
            if reads is not None and name in reads["watched"]:
                reads["read"].add(name)
            return value
        try:
            watching = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})
        except Exception as error:  # noqa: BLE001 - a metaclass or __init_subclass__ that refuses
            raise TypeError(f"cannot watch {cls.__name__}: {error}") from None
        _WATCHING[cls] = watching
    return _WATCHING[cls]


def integer_attributes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Module name -> its integer attributes, for the modules torch-pruning does not update."""
    found = {}
    for name, module in model.named_modules():
        ints = {key: value for key, value in module.__dict__.items()
                if isinstance(value, int) and not isinstance(value, bool) and not key.startswith("_")}
        if ints and _foreign(module):
            found[name] = ints
    return found


@dataclass
class ForwardRecord:
    """What one forward pass of the unpruned model showed: its output signature, and the integer
    attributes (module name, attribute) -> value that forward() read."""
    signature: object
    attributes: dict[tuple[str, str], int]


@torch.no_grad()
def record_forward(model: nn.Module, example_inputs) -> ForwardRecord:
    """Run `model` once on the example inputs, watching which integer attributes forward() reads."""
    watched = []
    modules = dict(model.named_modules())
    for name, ints in integer_attributes(model).items():
        module = modules[name]
        try:
            module.__class__ = _watching_class(type(module))
        except TypeError:  # a class that cannot be subclassed or swapped: its attributes go unwatched
            continue
        watched.append((name, module, type(module).__mro__[1]))
        module.__dict__["_tpx_reads"] = {"watched": set(ints), "read": set()}
    try:
        with eval_mode(model):
            outputs = run_model(model, example_inputs)
    finally:
        attributes = {}
        for name, module, cls in watched:
            module.__class__ = cls
            for key in module.__dict__.pop("_tpx_reads")["read"]:
                attributes[(name, key)] = module.__dict__[key]
    return ForwardRecord(signature(outputs), attributes)


def width_changes(before: dict, after: dict) -> dict[int, set[int]]:
    """old width -> the set of values layers of that width have now (a layer gone counts as unchanged)."""
    changes: dict[int, set[int]] = {}
    for key, old in before.items():
        changes.setdefault(old, set()).add(after.get(key, old))
    return changes


def sync_attributes(model: nn.Module, attributes: dict, before: dict) -> dict[str, tuple[int, int]]:
    """Update each recorded attribute that equals a width every layer of which changed to one same
    new value; returns 'module.attribute' -> (old, new) for what it updated. An attribute whose width
    changed in several ways is left as it was (the output check then decides)."""
    changes = width_changes(before, layer_widths(model))
    modules = dict(model.named_modules())
    updated = {}
    for (name, key), old in attributes.items():
        module = modules.get(name)
        new = changes.get(old, {old})
        if module is None or module.__dict__.get(key) != old or len(new) != 1 or new == {old}:
            continue
        module.__dict__[key] = next(iter(new))
        updated[f"{name}.{key}" if name else key] = (old, module.__dict__[key])
    return updated


def check_outputs(model: nn.Module, example_inputs, record: ForwardRecord, shapes: bool = True) -> str | None:
    """None if the model runs on the example inputs with outputs shaped as recorded (shapes=False:
    if it runs at all, for output layers the caller chose to prune), else why not."""
    try:
        with eval_mode(model), torch.no_grad():
            outputs = run_model(model, example_inputs)
    except Exception as error:  # noqa: BLE001 - any failure of the pruned forward is the finding
        return f"{type(error).__name__}: {first_line(error)}"
    if shapes and signature(outputs) != record.signature:
        return f"outputs shaped {shape_text(outputs)} instead of the original's"
    return None


def touches_attributes(group, record: ForwardRecord) -> bool:
    """Whether one of the recorded attributes equals a width of a layer in the group, or the group's
    channels pass a reshape in a forward() that reads integer attributes (a head count splitting them):
    then only a trial shows whether pruning the group breaks forward()."""
    if not record.attributes:
        return False
    if any(_reorders(item.dep.target.module) == "reshape" for item in group.items):
        return True
    values = set(record.attributes.values())
    for item in group.items:
        module = item.dep.target.module
        if isinstance(module, nn.Module) and any(
                module.__dict__.get(attribute) in values for attribute in _WIDTH_ATTRIBUTES):
            return True
    return len(group[0].idxs) in values


def trial_prune(model: nn.Module, example_inputs, plans: dict[str, list[int]], record: ForwardRecord,
                shapes: bool = True) -> str | None:
    """Prune a copy of `model` plainly (root layer name -> channels to remove) and check that each root
    lost exactly those channels and that the forward still runs as recorded."""
    trial = copy.deepcopy(model)
    graph = trace_graph(trial, example_inputs)
    modules = dict(trial.named_modules())
    before = layer_widths(trial)
    for name, pruned in plans.items():
        if pruned:
            root = modules[name]
            width = out_channels(root)
            group = full_group(graph, root)
            graph.get_pruning_group(root, group[0].dep.handler, sorted(pruned)).prune()
            if out_channels(root) != width - len(pruned):
                return (f"torch-pruning removes {width - out_channels(root)} out-channels of {name} for "
                        f"{len(pruned)} pruned channels (its index map does not follow a split of them)")
    sync_attributes(trial, record.attributes, before)
    return check_outputs(trial, example_inputs, record, shapes)


def breaking_groups(model: nn.Module, example_inputs, plans: dict[str, list[int]],
                    record: ForwardRecord, shapes: bool = True) -> dict[str, str]:
    """Root layer name -> why, for the groups whose plain pruning breaks forward() (tried together
    first: when that works, nothing is tried one by one)."""
    def trial(selected):
        return trial_prune(model, example_inputs, selected, record, shapes)
    if trial(plans) is None:
        return {}
    broken = {}
    for name, pruned in plans.items():
        error = trial({name: pruned})
        if error is not None:
            broken[name] = error
    rest = {name: pruned for name, pruned in plans.items() if name not in broken}
    while rest and trial(rest) is not None:
        # groups that only break together: keep the largest set that works, dropping from the end
        name = next(reversed(rest))
        broken[name] = "breaks forward() together with other groups"
        rest.pop(name)
    return broken
