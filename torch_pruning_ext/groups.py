"""Group numbering of the paper and a readable listing of a model's groups.

torch-pruning enumerates groups in trace order; the paper's released code walks ``named_modules()``
backwards over Conv/Linear roots (skipping a layer already pruned as an out-channel member of an
earlier group, and leaving unnumbered a group whose out-channel members include an ignored layer),
so group 0 is the one nearest the output. Numbers must match the paper for its tables to make sense.
"""
from __future__ import annotations

import difflib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from .attention import Attention, find_attention
from .inputs import first_line, run_model, shape_text, tensors_of
from .modes import eval_mode

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def out_channels(layer: nn.Module) -> int:
    """Output channels of a Conv (any dimension) or out-features of a Linear."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@dataclass
class GroupInfo:
    index: int
    root: str
    channels: int
    members: list[tuple[str, str]]  # (layer name, "out" | "in")

    def describe(self) -> str:
        parts = ", ".join(f"{name} ({side})" for name, side in self.members)
        return f"[{self.index}] {self.root}: {self.channels} channels; {parts}"


def output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/Linear layers whose out-channels reach a model output without another Conv/Linear."""
    found = []
    for module, node in graph.module2node.items():
        if not isinstance(module, ROOT_TYPES):
            continue
        pending, seen = [node], set()
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            if not current.outputs or current.type == tp.ops.OPTYPE.OUTPUT:
                found.append(module)
                break
            pending.extend(nxt for nxt in current.outputs if not isinstance(nxt.module, ROOT_TYPES))
    return found


# torch-pruning's group search visits each dependency a few times (at most 0.35 x the graph's nodes
# on torchvision's ResNet-152); on some graphs (grouped-query attention of Hugging Face LLaMA/Qwen
# models, VainF/Torch-Pruning#527) it never ends. Past this many visits per node it is stopped.
GROUP_SEARCH_VISITS_PER_NODE = 50
GROUP_SEARCH_MIN_VISITS = 1000


class _EndlessGroupSearch(Exception):
    pass


@contextmanager
def _bounded_group_search(limit: int):
    """Inside the block, a torch-pruning group search raises _EndlessGroupSearch after `limit` visits
    (the counter, a one-element list, is reset by the caller before each search)."""
    visits = [0]
    original = tp.dependency.group.Group.has_pruning_op

    def counted(self, dep, idxs):
        visits[0] += 1
        if visits[0] > limit:
            raise _EndlessGroupSearch
        return original(self, dep, idxs)
    tp.dependency.group.Group.has_pruning_op = counted
    try:
        yield visits
    finally:
        tp.dependency.group.Group.has_pruning_op = original


def numbered_roots(model: nn.Module, graph: tp.DependencyGraph, ignored_layers,
                   handled=()) -> list[nn.Module]:
    """Root layers of the numbered groups, index = position in the list (0 nearest the output). A layer
    whose group torch-pruning cannot finish searching is left out (unpruned), with a warning; the
    `handled` layers' out-channels are pruned elsewhere (attention projections) and never searched."""
    ignored = set(ignored_layers)
    covered: set[nn.Module] = set(handled)
    roots, endless = [], []
    names = {module: name for name, module in model.named_modules()}
    limit = GROUP_SEARCH_VISITS_PER_NODE * len(graph.module2node) + GROUP_SEARCH_MIN_VISITS
    with _bounded_group_search(limit) as visits:
        for _, module in reversed(list(model.named_modules())):
            if not isinstance(module, ROOT_TYPES) or module in covered or module not in graph.module2node:
                continue
            pruner = graph.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            visits[0] = 0
            try:
                group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                                list(range(pruner.get_out_channels(module))))
            except _EndlessGroupSearch:
                endless.append(names[module])
                covered.add(module)
                continue
            outs = [item.dep.target.module for item in group.items
                    if graph.is_out_channel_pruning_fn(item.dep.handler)]
            covered.update(outs)
            if not any(layer in ignored for layer in outs):
                roots.append(module)
    if endless:
        warnings.warn(f"torch-pruning's dependency search does not end for {', '.join(endless)} (known for "
                      "grouped-query attention, VainF/Torch-Pruning#527); those layers are left unpruned",
                      stacklevel=3)
    return roots


def full_group(graph: tp.DependencyGraph, root: nn.Module):
    """The group of `root`'s out-channels with all of its current channels."""
    pruner = graph.get_pruner_of_module(root)
    channels = pruner.get_out_channels(root)
    return graph.get_pruning_group(root, pruner.prune_out_channels, list(range(channels)))


def describe_groups(model: nn.Module, graph: tp.DependencyGraph, roots) -> list[GroupInfo]:
    names = {module: name for name, module in model.named_modules()}
    infos = []
    for index, root in enumerate(roots):
        group = full_group(graph, root)
        members = []
        for item in group.items:
            layer = item.dep.target.module
            if isinstance(layer, nn.Module) and next(layer.parameters(recurse=False), None) is not None \
                    or isinstance(layer, nn.modules.batchnorm._BatchNorm):
                side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
                members.append((names.get(layer, type(layer).__name__), side))
        infos.append(GroupInfo(index, names[root], len(group[0].idxs), members))
    return infos


# Layers torch-pruning's graph build cannot handle: it recurses through the shifted windows'
# index arithmetic until memory runs out (measured past 16 GB on swin_t), so refuse before tracing.
UNTRACEABLE = {"ShiftedWindowAttention": "shifted-window attention (Swin)",
               "ShiftedWindowAttentionV2": "shifted-window attention (Swin V2)"}


@contextmanager
def _all_requiring_grad(model: nn.Module):
    """Every parameter requires grad inside the block: torch-pruning traces the autograd graph, which
    a frozen model (requires_grad=False everywhere) does not build, leaving no group to prune."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def _traced_outputs(outputs) -> list[torch.Tensor]:
    """The output tensors autograd can trace back, from any nesting of tuples, lists and dicts (a Hugging
    Face ModelOutput, with its cache objects left out)."""
    return [tensor for tensor in tensors_of(outputs) if tensor.grad_fn is not None]


def trace_graph(model: nn.Module, example_inputs) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced in eval mode (tracing in train mode would
    update BatchNorm statistics) with autograd on (the tracer needs it, even inside torch.no_grad())."""
    for name, module in model.named_modules():
        if type(module).__name__ in UNTRACEABLE:
            raise ValueError(f"torch-pruning cannot build the dependency graph of {name} "
                             f"({UNTRACEABLE[type(module).__name__]}); this model cannot be pruned structurally")
    try:
        with eval_mode(model), torch.enable_grad(), _all_requiring_grad(model):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False,
                                                         output_transform=_traced_outputs)
    except ZeroDivisionError as error:  # e.g. a channel shuffle (ShuffleNet): a view torch-pruning cannot map
        raise ValueError(f"torch-pruning cannot build the dependency graph of {type(model).__name__} "
                         f"(its graph build fails with ZeroDivisionError: {error}); typical of channel-shuffle "
                         "views, which torch-pruning does not support") from error
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        try:  # blame the inputs only if the model itself cannot run them
            with eval_mode(model), torch.no_grad():
                run_model(model, example_inputs)
        except Exception as failure:  # noqa: BLE001 - any failure of the user's forward is reported as such
            raise ValueError(f"the model does not run on example inputs of shape {shape_text(example_inputs)}: "
                             f"{first_line(failure)}") from failure
        raise ValueError(f"torch-pruning could not trace {type(model).__name__}: {first_line(error)}") from error


def resolve_layers(model: nn.Module, layers, source: nn.Module | None = None) -> list[nn.Module]:
    """The modules of `model` that `layers` names, with everything inside them.

    Each entry is a module of `model`, a module of `source` (the model `model` was copied from: it
    is found in the copy by its name), a module name ("classifier", "features.3") or a module type
    (nn.Linear: every Linear). Anything that matches nothing is refused, naming it.
    """
    named = dict(model.named_modules())
    by_module = {module: name for name, module in model.named_modules()}
    source_names = {module: name for name, module in source.named_modules()} if source is not None else {}
    found: list[nn.Module] = []
    for entry in ([layers] if isinstance(layers, (nn.Module, str, type)) else list(layers)):
        if isinstance(entry, nn.Module):
            if entry in by_module:
                picked = [entry]
            elif entry in source_names:
                picked = [named[source_names[entry]]]
            else:
                raise ValueError(f"ignored_layers: {type(entry).__name__} {entry!r:.60} is not a module of the model; "
                                 "pass its modules, their names or module types")
        elif isinstance(entry, str):
            if entry not in named or entry == "":
                close = difflib.get_close_matches(entry, [n for n in named if n], n=3)
                raise ValueError(f"ignored_layers: no module named {entry!r} in the model"
                                 + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
            picked = [named[entry]]
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            picked = [module for module in model.modules() if isinstance(module, entry)]
            if not picked:
                raise ValueError(f"ignored_layers: the model has no {entry.__name__} module")
        else:
            raise ValueError(f"ignored_layers: {entry!r:.60} is not a module, a module name or a module type")
        found.extend(inner for module in picked for inner in module.modules())
    return list(dict.fromkeys(found))


def protected_layers(model: nn.Module, graph: tp.DependencyGraph, ignored_layers=None,
                     prune_output_layers: bool = False, source: nn.Module | None = None) -> list[nn.Module]:
    """The layers whose out-channels are never pruned: those `ignored_layers` names (see
    resolve_layers) and, unless prune_output_layers, the layers feeding the model's outputs."""
    protected = resolve_layers(model, ignored_layers, source) if ignored_layers is not None else []
    return protected + ([] if prune_output_layers else output_layers(graph))


def attention_layers(model: nn.Module, blocks: list[Attention]) -> set[nn.Module]:
    """The q/k/v projections of `blocks`: their out-channels are heads, not torch-pruning groups."""
    modules = dict(model.named_modules())
    return {modules[layer] for block in blocks for layer in block.layers()}


def describe_heads(blocks: list[Attention], first_index: int) -> list[GroupInfo]:
    """Head groups are numbered after the channel groups; their "channels" are prunable units."""
    return [GroupInfo(first_index + i, block.name, block.units, block.members()) for i, block in enumerate(blocks)]


def list_groups(model: nn.Module, example_inputs: torch.Tensor, ignored_layers=None,
                graph: tp.DependencyGraph | None = None, prune_output_layers: bool = False) -> list[GroupInfo]:
    """Index, root layer, member layers and channel count of every numbered group of `model`, the
    attention head groups last (pass the `graph` of a pruner or an earlier trace to avoid tracing again)."""
    graph = graph if graph is not None else trace_graph(model, example_inputs)
    protected = protected_layers(model, graph, ignored_layers, prune_output_layers)
    blocks = find_attention(model, set(protected))
    roots = numbered_roots(model, graph, protected, attention_layers(model, blocks))
    return describe_groups(model, graph, roots) + describe_heads(blocks, len(roots))
