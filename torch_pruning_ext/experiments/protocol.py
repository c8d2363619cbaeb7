"""The paper's protocol: prune one group (or several, or all) of a trained model, evaluate.

Data-free by default, as in the paper; Settings can add a repair after pruning and fine-tuning
(finetune_epochs > 0 trains every pruned copy before it is evaluated).

Shared by main.py and the sweep scripts so every table is produced by the same code path.
"""
from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from .data import dataset_info, normalize
from .evaluation import EVAL_BATCH_SIZE, accuracy
from .footprint import dense_bytes, peak_activation_bytes
from ..groups import ROOT_TYPES, list_groups, output_layers, trace_graph
from ..methods import METHODS, check_method, method_plan
from ..importance import DATA_CRITERIA, THINET_SAMPLES, build_importance
from ..optimal_transport import OptimalTransport
from ..bn_folding import fold_batchnorms
from ..pruner import IntraFusionPruner
from ..compress import check_schedule
from ..reconstruction import check_reconstruct_options
from ..repair import (DATA_MODES, RepairJob, apply_repair, batchnorm_sources, check_mode as check_repair,
                      layer_statistics)
from ..serialization import save_pruned
from ..checks import check_choice
from ..files import atomic_torch_save
from ..synthesis import synthesize_calibration
from .staged import PrefixCache, first_stage, has_stages, run_stages
from .training import train

RESULT_FIELDS = ("model", "dataset", "criterion", "group", "sparsity", "method", "accuracy", "params", "macs",
                 "prune_seconds")


@dataclass(frozen=True)
class Settings:
    """Everything besides (group, sparsity, method) that changes a cell's result."""
    model: str
    dataset: str
    criterion: str = "l1"
    p: float = 1.0
    source_prob: str = "uniform"
    target_prob: str = "uniform"
    target: str = "most_important"
    solver: str = "emd"
    bn_fold: str = "reference"
    seed: int = 0
    repair: str = "none"
    finetune_epochs: float = 0.0
    # data sizes, None = the default (and for settings they do not apply to), so rows written
    # before they were recorded keep their names
    taylor_batches: int | None = None
    repair_samples: int | None = None
    thinet_samples: int | None = None
    # how sparsity is spread over the groups of a multi-group cell: None = uniform (every group loses
    # `sparsity` of its channels, the paper), "global" = ranked together, capped per group
    schedule: str | None = None
    max_layer_sparsity: float | None = None
    # where a data repair's unlabelled inputs come from: None = real training images (the default),
    # "synthetic" = synthesised from the model's BatchNorm statistics (no data at all)
    calibration: str | None = None
    # reconstruct: calibration samples per chunk of its one pass (None = the library's default, 384)
    repair_batch_size: int | None = None

    def __post_init__(self):
        # numbers are stored as floats so that "--p 1" and the default name the same settings
        object.__setattr__(self, "p", float(self.p))
        object.__setattr__(self, "finetune_epochs", float(self.finetune_epochs))
        cap = check_schedule(self.schedule or "uniform", self.max_layer_sparsity)
        object.__setattr__(self, "max_layer_sparsity", cap)
        if self.schedule == "uniform":  # the default, named as rows written before schedules existed
            object.__setattr__(self, "schedule", None)
        check_choice(self.calibration or "data", CALIBRATIONS, "calibration")
        if self.calibration == "data":
            object.__setattr__(self, "calibration", None)
        check_repair_batch_size(self.repair_batch_size, [self.repair])

    def transport(self) -> OptimalTransport:
        return OptimalTransport(p=self.p, source_prob=self.source_prob, target_prob=self.target_prob,
                                target=self.target, solver=self.solver)


CALIBRATIONS = ("data", "synthetic")  # real unlabelled training images, or none at all
TAYLOR_BATCHES = 5  # calibration batches of 128 training images for the data-driven criteria
REPAIR_SAMPLES = 1024  # unlabelled images for the data repair modes


def check_data_sizes(**sizes: int) -> dict:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    return sizes


def data_sizes(criterion: str, repair: str, taylor_batches: int = TAYLOR_BATCHES,
               repair_samples: int = REPAIR_SAMPLES, thinet_samples: int = THINET_SAMPLES) -> dict:
    """Settings fields for the data sizes that change a cell: each only where it applies and differs
    from its default."""
    sizes = check_data_sizes(taylor_batches=taylor_batches, repair_samples=repair_samples,
                             thinet_samples=thinet_samples)
    applies = {"taylor_batches": criterion in DATA_CRITERIA, "repair_samples": repair in DATA_MODES,
               "thinet_samples": criterion == "thinet"}
    defaults = {"taylor_batches": TAYLOR_BATCHES, "repair_samples": REPAIR_SAMPLES, "thinet_samples": THINET_SAMPLES}
    return {name: value if applies[name] and value != defaults[name] else None for name, value in sizes.items()}


def cell_identity(settings: Settings, group, sparsity: float, method: str) -> dict:
    """The fields that name a result row (everything but the measurements), in file order."""
    fields = asdict(settings)
    head = {"model": fields.pop("model"), "dataset": fields.pop("dataset"), "criterion": fields.pop("criterion"),
            "group": group, "sparsity": sparsity, "method": method}
    return head | fields


def pruned_file_name(settings: Settings, group: str, sparsity: float, method: str) -> str:
    """model_dataset_criterion_gGROUP_sSPARSITY_method.pt, then every setting that is not the default
    (e.g. _repair-data_finetune-epochs-0.5), so variants of a cell never overwrite each other."""
    defaults = asdict(Settings(settings.model, settings.dataset, settings.criterion))
    extras = [f"{key.replace('_', '-')}-{value:g}" if isinstance(value, float) else f"{key.replace('_', '-')}-{value}"
              for key, value in asdict(settings).items() if value != defaults[key]]
    return "_".join([settings.model, settings.dataset, settings.criterion, f"g{group}", f"s{sparsity:g}", method]
                    + extras) + ".pt"


def num_outputs(model: nn.Module) -> int:
    """Number of outputs of the model's last Linear layer."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def repair_images(pool, info, count: int, seed: int) -> torch.Tensor:
    """`count` unlabelled, normalised images drawn (with the seed) from a calibration pool."""
    if count > len(pool):
        raise ValueError(f"--repair-samples {count} is more than the {len(pool)} calibration images available")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:count]
    return normalize(pool.images[order], info)


def check_schedule_flags(schedule: str, max_layer_sparsity: float | None) -> None:
    """Before any work: check_schedule, worded in the command line's flags."""
    if max_layer_sparsity is not None and schedule != "global":
        raise ValueError("--max-layer-sparsity caps the global schedule; add --schedule global")
    check_schedule(schedule, max_layer_sparsity)


def check_repair_batch_size(batch_size: int | None, repairs, samples: int | None = None) -> None:
    """Before any work: a reconstruction batch size is a positive integer, for a run that reconstructs
    (of `samples` calibration samples, if given: not cut into too many chunks)."""
    check_reconstruct_options(batch_size, samples=samples)
    if batch_size is not None and "reconstruct" not in repairs:
        raise ValueError(f"--repair-batch-size {batch_size} applies to --repair reconstruct only, not "
                         f"{' '.join(repairs)}")


def check_calibration(calibration: str, repairs, criteria) -> None:
    """Before any work: synthetic calibration feeds the data repairs, so it needs one, and it cannot
    stand in for the labelled batches of the data-driven criteria."""
    check_choice(calibration, CALIBRATIONS, "calibration")
    if calibration != "synthetic":
        return
    if not set(repairs) & set(DATA_MODES):
        raise ValueError(f"--calibration synthetic feeds a data repair, but --repair is {' '.join(repairs)}: "
                         f"use one of {', '.join(DATA_MODES)}")
    labelled = sorted(set(criteria) & set(DATA_CRITERIA))
    if labelled:
        raise ValueError(f"criterion {labelled[0]} is measured on labelled training batches, which --calibration "
                         "synthetic does not provide: use a data-free criterion (l1, l2, ...)")


def synthetic_images(model: nn.Module, example: torch.Tensor, count: int, seed: int, cache: Path | None = None,
                     progress=None):
    """`count` calibration images shaped like `example`, synthesised (seeded) from `model`'s BatchNorm
    statistics, and the synthesis report as a dict. With `cache` (a file), inputs made before for the
    same model, count and seed are read back instead of synthesised again (minutes for a resumed sweep)."""
    fingerprint = hashlib.sha1(b"".join(t.detach().cpu().numpy().tobytes()
                                        for t in model.state_dict().values())).hexdigest()
    identity = {"fingerprint": fingerprint, "count": count, "seed": seed}
    if cache is not None and cache.exists():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        if all(stored.get(k) == v for k, v in identity.items()):
            return stored["inputs"], stored["report"]
    inputs, report = synthesize_calibration(model, example, count, seed=seed, progress=progress)
    report = asdict(report)
    if cache is not None:
        atomic_torch_save(identity | {"inputs": inputs, "report": report}, cache)
    return inputs, report


@dataclass
class PreparedModel:
    """A trained model with its BatchNorms folded, traced once: what every cell starts from."""
    folded: nn.Module
    bn_fold: str | None
    batchnorm_of: dict  # layer name -> name of the BatchNorm folded into it (or following its ReLU)
    after_relu: set  # the layers of batchnorm_of whose BatchNorm follows a ReLU
    ignored_names: list  # layers feeding the output, never pruned
    groups: list  # GroupInfo of every numbered group

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def expand(self, group) -> list[int]:
        """The group indices of a cell's group: an index, a list of them or "all"."""
        return list(range(self.num_groups)) if group == "all" else \
            list(group) if isinstance(group, (list, tuple)) else [group]

    def first_stage(self, group) -> int:
        """The first of the model's stages() that pruning `group` changes (0 without stages)."""
        if not has_stages(self.folded):
            return 0
        return first_stage(self.folded, [name for g in self.expand(group) for name, _ in self.groups[g].members])


def prepare(model: nn.Module, example: torch.Tensor, bn_fold: str | None) -> PreparedModel:
    """Fold a copy of `model` (the input is not changed) and list its groups, with one graph trace."""
    folded = copy.deepcopy(model).eval()
    graph = trace_graph(folded, example)
    pairs = fold_batchnorms(folded, example, bn_fold, graph=graph) if bn_fold else []
    names = {module: name for name, module in folded.named_modules()}
    ignored = output_layers(graph)
    return PreparedModel(folded, bn_fold, *batchnorm_sources(pairs),
                         [names[layer] for layer in ignored], list_groups(folded, example, ignored, graph=graph))


class Protocol:
    """Runs cells on copies of one trained model; the folded model is built once and cloned.

    reuse: evaluate each pruned copy from the cached activation of the layers before the pruned
    group (models with ``stages()``), which gives the same numbers as a full forward pass.
    prepared: the folded model and its groups (`prepare`), shared by protocols of one model and fold
    so the graph is traced once for them all.
    prefix_cache: the cache of another Protocol on the same model, test inputs and BatchNorm fold
    (e.g. the same cells under another repair mode), to share its work instead of building one.
    score_cache: likewise the score cache of another Protocol on the same model, criterion and
    calibration batches.
    """

    def __init__(self, model: nn.Module, settings: Settings, test_inputs: torch.Tensor, test_labels: torch.Tensor,
                 calibration_batches=None, batch_size: int = EVAL_BATCH_SIZE, device="cpu", reuse: bool = True,
                 save_dir=None, repair_inputs: torch.Tensor | None = None, train_set=None, gates=None,
                 prefix_cache: PrefixCache | None = None, score_cache: dict | None = None,
                 prepared: PreparedModel | None = None):
        self.settings = settings
        self.model = model.eval()
        self.inputs, self.labels = test_inputs, test_labels
        self.batch_size, self.device = batch_size, torch.device(device)
        self.example = test_inputs[:1]
        self.calibration_batches = calibration_batches
        self.save_dir = save_dir
        self.settings.transport()  # validate the options before any work
        check_repair(settings.repair)
        if settings.repair in DATA_MODES and repair_inputs is None:
            raise ValueError(f"repair mode {settings.repair!r} needs unlabelled images (repair_inputs)")
        self.repair_inputs = repair_inputs
        self._reference_stats = None
        if settings.finetune_epochs < 0 or (settings.finetune_epochs > 0 and train_set is None):
            raise ValueError(f"finetune_epochs={settings.finetune_epochs!r} needs a non-negative value and a "
                             "training set")
        self.train_set = train_set
        self.gates = gates
        self._importance()  # a bad criterion or missing gates fail here
        if prepared is None:
            prepared = prepare(model, self.example, settings.bn_fold)
        elif prepared.bn_fold != settings.bn_fold:
            raise ValueError(f"the prepared model was folded with bn_fold={prepared.bn_fold!r}, "
                             f"the settings ask for {settings.bn_fold!r}")
        self.prepared = prepared
        self.folded = prepared.folded  # cells prune copies; the repairs only read it
        self.batchnorm_of, self.ignored_names = prepared.batchnorm_of, prepared.ignored_names
        self.after_relu = prepared.after_relu
        self.num_groups = prepared.num_groups
        # every cell prunes a copy of self.folded, so the scores of the first group it prunes repeat
        self.score_cache = (score_cache if score_cache is not None else {}) if reuse else None
        self.cache = None
        if reuse and has_stages(self.folded):
            self.cache = prefix_cache or PrefixCache(self.folded, test_inputs, batch_size, self.device)

    def _importance(self):
        return build_importance(self.settings.criterion, self.gates, self.settings.thinet_samples)

    def _ignored(self, model: nn.Module) -> list[nn.Module]:
        modules = dict(model.named_modules())
        return [modules[name] for name in self.ignored_names]

    def _accuracy(self, model: nn.Module, groups) -> float:
        if self.cache is None or groups is None or self.settings.finetune_epochs > 0:  # fine-tuning moves every layer
            return accuracy(model, self.inputs, self.labels, self.batch_size, self.device)
        start = self.prepared.first_stage(groups)
        logits = run_stages(model, self.cache.activations(start), start, None, self.batch_size, self.device)
        return (logits.argmax(dim=1) == self.labels).float().mean().item()

    def _row(self, model: nn.Module, group, sparsity, method, seconds, groups=None) -> dict:
        model = model.to(self.device)
        macs, params = tp.utils.count_ops_and_params(model, self.example.to(self.device))
        acc = self._accuracy(model, groups)
        measured = {"accuracy": round(100 * acc, 4), "params": int(params), "macs": int(macs),
                    "prune_seconds": round(seconds, 4), "dense_bytes": dense_bytes(model),
                    "peak_activation_bytes": peak_activation_bytes(model, self.example.to(self.device))}
        return cell_identity(self.settings, group, sparsity, method) | measured

    def base_row(self) -> dict:
        """The unpruned model as loaded (method "base")."""
        return self._row(copy.deepcopy(self.model), None, 0.0, "base", 0.0)

    def prune_copy(self, groups, sparsity: float, method: str):
        """A pruned copy of the folded model, the per-group results and the pruning time."""
        check_method(method)
        torch.manual_seed(self.settings.seed)  # the random criterion's draws repeat per cell (GMM: random_state 0)
        model = copy.deepcopy(self.folded)
        started = time.perf_counter()
        pruner = IntraFusionPruner(model, self.example, importance=self._importance(),
                                   fold_bn=None,
                                   ignored_layers=self._ignored(model),
                                   calibration_batches=self.calibration_batches,
                                   score_cache=self.score_cache)
        transport, rule = method_plan(method, self.settings.transport(), self.settings.seed)
        results = pruner.prune(groups, sparsity, transport, fusion_rule=rule,
                               global_pruning=self.settings.schedule == "global",
                               max_group_sparsity=self.settings.max_layer_sparsity)
        self._repair(model, results)
        if self.settings.finetune_epochs > 0:
            train(model, self.train_set, dataset_info(self.settings.dataset), self.settings.finetune_epochs,
                  lr=0.01, seed=self.settings.seed, device=self.device)
            model.cpu()
        return model, results, time.perf_counter() - started

    def _repair(self, model: nn.Module, results) -> None:
        mode = self.settings.repair
        if mode in ("data", "data_downstream") and self._reference_stats is None:
            # the original's statistics, measured once for all cells
            names = [name for name, module in self.folded.named_modules() if isinstance(module, ROOT_TYPES)]
            self._reference_stats = layer_statistics(self.folded, names, self.repair_inputs)
        apply_repair(mode, RepairJob(self.model, self.folded, model, results, self.batchnorm_of, self.after_relu,
                                     self.repair_inputs, protected=frozenset(self.ignored_names),
                                     reference_stats=self._reference_stats, seed=self.settings.seed,
                                     batch_size=self.settings.repair_batch_size))

    def run_cells(self, cells, progress=None) -> list[dict]:
        """Rows of (group, sparsity, method) cells, in the order given. They are computed in the order
        of their first pruned stage, from the input on, so the prefix cache only moves forward: the
        unpruned layers before the groups run once per protocol, not once per group."""
        order = sorted(range(len(cells)), key=lambda i: self.prepared.first_stage(cells[i][0]))
        rows = {}
        for i in order:
            rows[i] = self.run_cell(*cells[i])
            if progress is not None:
                progress()
        return [rows[i] for i in range(len(cells))]

    def run_cell(self, group, sparsity: float, method: str) -> dict:
        """One row: `group` is an index, a list of indices, or "all" (whole-network pruning)."""
        groups = self.prepared.expand(group)
        model, results, seconds = self.prune_copy(groups, sparsity, method)
        label = group if isinstance(group, int) else "all" if groups == list(range(self.num_groups)) \
            else " ".join(map(str, groups))
        row = self._row(model, label, sparsity, method, seconds, groups)
        # groups left unpruned because pruning them would break the model (the pruner warned)
        row["skipped_groups"] = " ".join(str(r.group) for r in results if r.skipped_reason)
        if self.save_dir is not None:
            name = pruned_file_name(self.settings, str(label).replace(" ", "-"), sparsity, method)
            save_pruned(model.cpu(), Path(self.save_dir) / name, self.settings.model, int(num_outputs(model)),
                        metadata=row)
        return row
