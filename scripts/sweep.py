#!/usr/bin/env python
"""Resumable, shardable sweep of the data-free protocol: models x criteria x groups x sparsities x methods.

Rows go to RUN_DIR/results.csv, rewritten atomically under the file's lock after every cell, so a killed
sweep loses at most the cell in progress and a rerun skips every finished cell. --shard i/N runs
every N-th cell (starting with the i-th), so N processes or machines can share one sweep.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from torch_pruning_ext.experiments.checkpoints import load_model, resolve_checkpoint  # noqa: E402
from torch_pruning_ext.compress import SCHEDULES  # noqa: E402
from torch_pruning_ext.experiments.cli import (OneLineParser, choice, device, positive_int, run_cli,  # noqa: E402
                                             sparsity, synthesise_with_progress)
from torch_pruning_ext.experiments.evaluation import EVAL_BATCH_SIZE  # noqa: E402
from torch_pruning_ext.files import check_writable_dir, file_lock  # noqa: E402
from torch_pruning_ext.experiments.data import (DATASETS, calibration_batches, calibration_set, dataset_info,  # noqa: E402
                                    load_split, normalize)
from torch_pruning_ext.importance import CRITERIA, DATA_CRITERIA, THINET_SAMPLES  # noqa: E402
from torch_pruning_ext.experiments.models import MODEL_BUILDERS  # noqa: E402
from torch_pruning_ext.experiments.protocol import (CALIBRATIONS, METHODS, REPAIR_SAMPLES, TAYLOR_BATCHES,  # noqa: E402
                                                    Protocol, Settings, cell_identity, check_calibration,
                                                    check_data_sizes, check_repair_batch_size, check_schedule_flags,
                                                    data_sizes, prepare, repair_images)
from torch_pruning_ext.repair import DATA_MODES, REPAIR_MODES  # noqa: E402
from torch_pruning_ext.experiments.results import check_results_file, read_rows, row_key, write_rows  # noqa: E402


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must look like i/N, got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 1 <= i <= N")
    return index, count


def shard_from_environment(environ=os.environ) -> tuple[int, int]:
    """The shard of a SLURM job array task (1/1 outside one): task ids must run in steps of 1, from
    SLURM_ARRAY_TASK_MIN, and SLURM_ARRAY_TASK_COUNT tasks make the N of i/N."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return 1, 1
    try:
        task, first = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        count, step = int(environ["SLURM_ARRAY_TASK_COUNT"]), int(environ.get("SLURM_ARRAY_TASK_STEP", 1))
    except (KeyError, ValueError):
        raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT/_MIN are missing or not integers; "
                         "pass --shard i/N") from None
    if step != 1:
        raise ValueError(f"SLURM_ARRAY_TASK_STEP is {step}: submit the array with consecutive ids (e.g. --array=1-4) "
                         "or pass --shard i/N")
    try:
        return parse_shard(f"{task - first + 1}/{count}")
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"SLURM array task {task} (min {first}, count {count}) gives {error}") from None


def model_checkpoint(text: str) -> tuple[str, str]:
    model, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"must look like MODEL=FILE, got {text!r}")
    return choice(sorted(MODEL_BUILDERS), "model")(model), path


def group_spec(text: str):
    if text in ("all-single", "whole"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group {text!r} is not an index, 'all-single' or 'whole'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sweep.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--run-dir", required=True, help="folder of this sweep; results.csv is written there")
    add("--models", nargs="+", choices=sorted(MODEL_BUILDERS), default=["vgg11_bn", "resnet18"])
    add("--dataset", choices=sorted(DATASETS), default="fashion-mnist")
    add("--data-dir", default=None)
    add("--no-download", action="store_true")
    add("--checkpoint", action="append", default=[], metavar="MODEL=FILE", type=model_checkpoint,
        help="checkpoint for a model (else the usual lookup: models/, models.zip)")
    add("--criteria", nargs="+", choices=CRITERIA, default=["l1", "taylor"])
    add("--groups", nargs="+", type=group_spec, default=["all-single"],
        help="group indices, 'all-single' (every group alone, default) and/or 'whole' (all groups together)")
    add("--sparsities", nargs="+", type=sparsity, default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    add("--methods", nargs="+", choices=list(METHODS), default=["default", "intra_fusion", "intra_fusion_fp"])
    add("--shard", type=parse_shard, default=None,
        help="run cells i, i+N, i+2N, ... (1-based i/N); default: from SLURM_ARRAY_TASK_ID/_MIN/_COUNT "
             "inside a SLURM job array, else 1/1")
    add("--taylor-batches", type=int, default=TAYLOR_BATCHES)
    add("--thinet-samples", type=int, default=THINET_SAMPLES)
    add("--batch-size", type=positive_int, default=EVAL_BATCH_SIZE)
    add("--seed", type=int, default=0)
    add("--bn-fold", choices=["reference", "exact"], default="reference")
    add("--device", type=device, default="cpu")
    add("--repair", nargs="+", choices=REPAIR_MODES, default=["none"],
        help="repair modes to sweep (each is its own set of rows)")
    add("--repair-samples", type=int, default=REPAIR_SAMPLES,
        help="unlabelled images for the data repairs (training images, or synthesised ones)")
    add("--repair-batch-size", type=positive_int, default=None,
        help="--repair reconstruct: calibration images per chunk of its one pass (default: 384)")
    add("--calibration", default="data", type=choice(CALIBRATIONS, "calibration"),
        help="data = unlabelled training images; synthetic = no data, inputs synthesised from each model's "
             "BatchNorm statistics (kept in RUN_DIR/synthetic/ so a resumed sweep does not redo them)")
    add("--schedule", choices=SCHEDULES, default="uniform", help="how whole-network cells spread the sparsity")
    add("--max-layer-sparsity", type=sparsity, default=None, help="cap per group for --schedule global")
    add("--finetune-epochs", type=float, default=0, help="fine-tune every pruned model (default 0: data-free)")
    add("--save-pruned", default=None, metavar="DIR", help="save every pruned model to DIR")
    return parser


def expand_groups(specs, count: int, model: str) -> list:
    groups = []
    for spec in specs:
        if spec == "all-single":
            groups += list(range(count))
        elif spec == "whole":
            groups.append("all")
        elif not 0 <= spec < count:
            raise ValueError(f"group index {spec} is not in {model}: valid indices are 0..{count - 1}")
        else:
            groups.append(spec)
    return list(dict.fromkeys(groups))


def plan_cells(block: list[Settings], groups, sparsities, methods) -> list[tuple]:
    """(settings, (group, sparsity, method)) cells of one (model, criterion) block, whose settings
    differ only in the repair mode: the unpruned "base" rows first, then group by group, so the
    protocols of the block share each cached prefix activation while it is in memory."""
    cells = [(settings, (None, 0.0, "base")) for settings in block]
    for group in groups:
        cells += [(settings, (group, s, m)) for settings in block for s in sparsities for m in methods]
    return cells


def _block_of(settings: Settings) -> Settings:
    """What the settings of one block share: everything but the repair mode and its sample count."""
    return replace(settings, repair="none", repair_samples=None, calibration=None, repair_batch_size=None)


def sweep(args) -> int:
    run_dir = check_writable_dir(args.run_dir, "--run-dir")
    results = check_results_file(run_dir / "results.csv")
    checkpoints = dict(args.checkpoint)
    unused = sorted(set(checkpoints) - set(args.models))
    if unused:
        raise ValueError(f"--checkpoint {unused[0]}=...: {unused[0]} is not in --models")
    check_data_sizes(taylor_batches=args.taylor_batches, repair_samples=args.repair_samples,
                     thinet_samples=args.thinet_samples)
    check_schedule_flags(args.schedule, args.max_layer_sparsity)
    check_calibration(args.calibration, args.repair, args.criteria)
    check_repair_batch_size(args.repair_batch_size, args.repair, args.repair_samples)
    index, count = args.shard or shard_from_environment()
    if args.save_pruned:
        check_writable_dir(args.save_pruned, "--save-pruned")
    paths = {name: resolve_checkpoint(name, args.dataset, checkpoints.get(name), ROOT) for name in args.models}
    run_dir.mkdir(parents=True, exist_ok=True)
    info = dataset_info(args.dataset)
    test = load_split(args.dataset, "test", args.data_dir, download=not args.no_download)
    inputs = normalize(test.images, info)
    batches = None
    if set(args.criteria) & set(DATA_CRITERIA):
        batches = calibration_batches(calibration_set(args.dataset, args.data_dir, not args.no_download), info,
                                      args.taylor_batches, 128, args.seed)
    # The full, ordered cell list: identical in every shard, so shards partition it exactly.
    blocks = []
    for model_name in args.models:
        loaded = load_model(paths[model_name], model_name, args.dataset, info.num_classes)
        for criterion in args.criteria:
            blocks.append((loaded, [Settings(model_name, args.dataset, criterion, bn_fold=args.bn_fold, seed=args.seed,
                                             repair=repair, finetune_epochs=args.finetune_epochs,
                                             **data_sizes(criterion, repair, args.taylor_batches,
                                                          args.repair_samples, args.thinet_samples),
                                             schedule=args.schedule, max_layer_sparsity=args.max_layer_sparsity,
                                             calibration=args.calibration if repair in DATA_MODES else None,
                                             repair_batch_size=args.repair_batch_size if repair == "reconstruct"
                                             else None)
                                    for repair in args.repair]))
    repair_inputs = {}  # model name -> its data repairs' inputs, made when its first cell needs them
    if set(args.repair) & set(DATA_MODES) and args.calibration == "data":
        images = repair_images(calibration_set(args.dataset, args.data_dir, not args.no_download), info,
                               args.repair_samples, args.seed)
        repair_inputs = {name: images for name in args.models}
    train_set = None
    if args.finetune_epochs > 0:
        train_set = load_split(args.dataset, "train", args.data_dir, download=not args.no_download)
    with file_lock(results):
        done = {row_key(row) for row in read_rows(results)}
    planned, prepared = [], {}  # model name -> its folded copy and groups, traced once for every protocol
    for loaded, block in blocks:
        name = block[0].model
        if name not in prepared:
            prepared[name] = prepare(loaded.model, inputs[:1], args.bn_fold)
        # from the input on, so the protocols' prefix cache only moves forward
        groups = sorted(expand_groups(args.groups, prepared[name].num_groups, name), key=prepared[name].first_stage)
        planned += [(loaded, settings, cell) for settings, cell in
                    plan_cells(block, groups, args.sparsities, args.methods)]
    mine = planned[index - 1::count]
    pending = [job for job in mine if row_key(cell_identity(job[1], *job[2])) not in done]
    print(f"{len(planned)} cells in the sweep, {len(mine)} in shard {index}/{count}, "
          f"{len(mine) - len(pending)} already done, {len(pending)} to run", file=sys.stderr)
    protocols: dict[Settings, Protocol] = {}  # those of the current block, sharing their caches
    for loaded, settings, (group, level, method) in tqdm(pending, unit="cell", desc="sweep"):
        if settings not in protocols:
            if any(_block_of(settings) != _block_of(other) for other in protocols):
                protocols.clear()  # a new block: free the old protocols and their cache
            first = next(iter(protocols.values()), None)
            caches = {"prefix_cache": first.cache, "score_cache": first.score_cache} if first else {}
            if settings.calibration == "synthetic" and settings.model not in repair_inputs:
                cache = run_dir / "synthetic" / f"{settings.model}_n{args.repair_samples}_seed{args.seed}.pt"
                cache.parent.mkdir(exist_ok=True)
                repair_inputs[settings.model] = synthesise_with_progress(loaded.model, inputs[:1], args.repair_samples,
                                                                         args.seed, cache)
            protocols[settings] = Protocol(loaded.model, settings, inputs, test.labels, batches, args.batch_size,
                                           args.device, save_dir=args.save_pruned,
                                           repair_inputs=repair_inputs.get(settings.model),
                                           train_set=train_set, gates=loaded.gates,
                                           prepared=prepared[settings.model], **caches)
        protocol = protocols[settings]
        row = protocol.base_row() if method == "base" else protocol.run_cell(group, level, method)
        write_rows(results, [row])  # under the results file's lock
    return 0


def main(argv=None) -> int:
    return run_cli("sweep.py", sweep, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
