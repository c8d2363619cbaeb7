#!/usr/bin/env python
"""The paper's protocol: default pruning vs Intra-Fusion, one group at a time (or "all").

Data-free by default (no fine-tuning, no repair), as in the paper; --finetune-epochs fine-tunes every
pruned model and --repair adds a repair step.

`python main.py` runs VGG11-BN on the shipped Fashion-MNIST checkpoint and bundled test set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from torch_pruning_ext.experiments.checkpoints import load_model, resolve_checkpoint
from torch_pruning_ext.experiments.cli import (OneLineParser, choice, device, positive_int, run_cli, sparsity,
                                              synthesise_with_progress)
from torch_pruning_ext.experiments.data import DATASETS, calibration_batches, calibration_set, dataset_info, load_split, normalize
from torch_pruning_ext.experiments.evaluation import EVAL_BATCH_SIZE
from torch_pruning_ext.importance import CRITERIA, DATA_CRITERIA, THINET_SAMPLES
from torch_pruning_ext.experiments.models import MODEL_BUILDERS
from torch_pruning_ext.optimal_transport import PROBABILITIES, SOLVERS, TARGETS
from torch_pruning_ext.experiments.protocol import (CALIBRATIONS, METHODS, REPAIR_SAMPLES, TAYLOR_BATCHES, Protocol,
                                                    Settings, check_calibration, check_repair_batch_size, check_schedule_flags,
                                                    data_sizes, prepare, repair_images)
from torch_pruning_ext.repair import DATA_MODES, REPAIR_MODES
from torch_pruning_ext.files import check_writable_dir
from torch_pruning_ext.experiments.results import check_results_file, format_table, write_rows
from torch_pruning_ext.bn_folding import FOLD_MODES
from torch_pruning_ext.compress import SCHEDULES

ROOT = Path(__file__).resolve().parent


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="main.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model-name", "--model_name", default="vgg11_bn", type=choice(list(MODEL_BUILDERS), "model"))
    add("--dataset", default="fashion-mnist", type=choice(list(DATASETS), "dataset"))
    add("--data-dir", "--data_dir", default=None, help="folder holding the data set (else ./data, system copies)")
    add("--no-download", "--no_download", action="store_true", help="never try to download a data set")
    add("--checkpoint", default=None, help="checkpoint file, models.zip, or models.zip:MEMBER")
    add("--group_idxs", "--group-idxs", nargs="+", type=group_index, default=[1, 2, 3],
        help="groups to prune, one at a time; 'all' prunes every group together (the whole network)")
    add("--sparsities", nargs="+", type=sparsity, default=[0.3, 0.4, 0.5, 0.6, 0.7])
    add("--importance_criteria", "--importance-criteria", nargs="+", type=choice(CRITERIA, "criterion"),
        default=["l1"])
    add("--methods", nargs="+", type=choice(list(METHODS), "method"), default=["default", "intra_fusion"])
    add("--schedule", default="uniform", type=choice(SCHEDULES, "schedule"),
        help="with --group_idxs all: uniform = every group loses the same fraction (the paper); global = "
             "channels of all groups ranked together, so groups whose channels all matter lose fewer")
    add("--max-layer-sparsity", "--max_layer_sparsity", type=sparsity, default=None,
        help="with --schedule global: no group loses more than this fraction of its channels")
    add("--p", type=float, default=1, help="p of the p-norm transport cost")
    add("--source_prob", "--source-prob", default="uniform", type=choice(PROBABILITIES, "source_prob"))
    add("--target_prob", "--target-prob", default="uniform", type=choice(PROBABILITIES, "target_prob"))
    add("--target", default="most_important", type=choice(TARGETS, "target"))
    add("--solver", default="emd", type=choice(SOLVERS, "solver"))
    add("--bn-fold", "--bn_fold", default="reference", type=choice(FOLD_MODES, "bn fold mode"),
        help="reference = the released fold (no eps); exact = output-preserving")
    add("--repair", default="none", type=choice(REPAIR_MODES, "repair mode"),
        help="after pruning, restore channel statistics: data (unlabelled images; data_downstream also "
             "corrects every later layer) or datafree (BN statistics); reconstruct refits every layer by "
             "least squares on unlabelled images (the whole-network choice)")
    add("--repair-samples", "--repair_samples", type=int, default=REPAIR_SAMPLES,
        help="unlabelled images for --repair data/data_downstream/reconstruct (training images, or "
             "synthesised ones with --calibration synthetic)")
    add("--repair-batch-size", "--repair_batch_size", type=positive_int, default=None,
        help="--repair reconstruct: run the calibration images in chunks of this many (memory; still one "
             "pass over them; default: 384)")
    add("--calibration", default="data", type=choice(CALIBRATIONS, "calibration"),
        help="where the data repairs' inputs come from: data = unlabelled training images; synthetic = no "
             "data at all, inputs synthesised from the checkpoint's BatchNorm statistics (minutes)")
    add("--finetune-epochs", "--finetune_epochs", type=float, default=0,
        help="fine-tune every pruned model this many epochs (fractions allowed; default 0 = data-free)")
    add("--gpu_id", "--gpu-id", type=int, default=-1, help="CUDA device index, -1 = CPU")
    add("--device", type=device, default=None, help="torch device string, overrides --gpu_id (cpu, cuda:0, ...)")
    add("--taylor-batches", "--taylor_batches", type=int, default=TAYLOR_BATCHES,
        help="training batches of 128 for the data-driven criteria (taylor, chip, taylor_fm, thinet)")
    add("--thinet-samples", "--thinet_samples", type=int, default=THINET_SAMPLES,
        help="sampled outputs per consuming layer for the thinet criterion")
    add("--batch-size", "--batch_size", type=positive_int, default=EVAL_BATCH_SIZE, help="evaluation batch size")
    add("--seed", type=int, default=0)
    add("--output", default=None, help="write rows to FILE.csv or FILE.json (merged with rows already there)")
    add("--no-reuse", "--no_reuse", action="store_true",
        help="evaluate every cell with a full forward pass instead of reusing the unchanged prefix")
    add("--save-pruned", "--save_pruned", default=None, metavar="DIR",
        help="save every pruned model to DIR (load with torch_pruning_ext.load_pruned)")
    add("--list-groups", "--list_groups", action="store_true", help="print the model's groups and exit")
    return parser


def group_index(value: str):
    """A group index, or "all" for the whole network."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group index must be an integer or 'all', got {value!r}") from None


def pick_device(args) -> torch.device:
    if args.device is not None:
        return args.device
    try:
        return device("cpu" if args.gpu_id < 0 else f"cuda:{args.gpu_id}")
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"--gpu_id {args.gpu_id}: {str(error).split(';')[0]}; use --gpu_id -1 for the CPU") from None


def run(args) -> int:
    device = pick_device(args)
    sizes = {criterion: data_sizes(criterion, args.repair, args.taylor_batches, args.repair_samples,
                                   args.thinet_samples) for criterion in args.importance_criteria}
    check_schedule_flags(args.schedule, args.max_layer_sparsity)
    check_calibration(args.calibration, [args.repair], args.importance_criteria)
    check_repair_batch_size(args.repair_batch_size, [args.repair], args.repair_samples)
    output = check_results_file(args.output) if args.output else None
    if args.save_pruned:
        check_writable_dir(args.save_pruned, "--save-pruned")
    info = dataset_info(args.dataset)
    path = resolve_checkpoint(args.model_name, args.dataset, args.checkpoint, ROOT)
    loaded = load_model(path, args.model_name, args.dataset, info.num_classes)
    example = torch.zeros(1, 3, 32, 32)
    prepared = prepare(loaded.model, example, args.bn_fold)  # the run's one extra graph trace
    if args.list_groups:
        for group in prepared.groups:
            print(group.describe())
        return 0
    count = prepared.num_groups
    bad = [g for g in args.group_idxs if g != "all" and not 0 <= g < count]
    if bad:
        raise ValueError(f"group index {bad[0]} is not in {args.model_name}: valid indices are 0..{count - 1}")

    test = load_split(args.dataset, "test", args.data_dir, download=not args.no_download)
    inputs = normalize(test.images, info)
    batches = None
    if set(args.importance_criteria) & set(DATA_CRITERIA):
        batches = calibration_batches(calibration_set(args.dataset, args.data_dir, not args.no_download), info, args.taylor_batches,
                                      128, args.seed)
    repair_inputs = None
    if args.repair in DATA_MODES and args.calibration == "synthetic":
        repair_inputs = synthesise_with_progress(loaded.model, example, args.repair_samples, args.seed)
    elif args.repair in DATA_MODES:
        repair_inputs = repair_images(calibration_set(args.dataset, args.data_dir, not args.no_download), info,
                                      args.repair_samples, args.seed)
    train_set = None
    if args.finetune_epochs > 0:
        train_set = load_split(args.dataset, "train", args.data_dir, download=not args.no_download)
        print(f"fine-tuning on {len(train_set)} training images", file=sys.stderr)
    print(f"{args.model_name} on {args.dataset} ({len(test)} test images), checkpoint {loaded.source}",
          file=sys.stderr)
    rows = []
    for criterion in args.importance_criteria:
        settings = Settings(args.model_name, args.dataset, criterion, args.p, args.source_prob, args.target_prob,
                            args.target, args.solver, args.bn_fold, args.seed, args.repair, args.finetune_epochs,
                            **sizes[criterion], schedule=args.schedule, max_layer_sparsity=args.max_layer_sparsity,
                            calibration=args.calibration,  # "data" is the default; synthetic needs a data repair
                            repair_batch_size=args.repair_batch_size)
        protocol = Protocol(loaded.model, settings, inputs, test.labels, batches, args.batch_size, device,
                            reuse=not args.no_reuse, save_dir=args.save_pruned, repair_inputs=repair_inputs,
                            train_set=train_set, gates=loaded.gates, prepared=prepared)
        criterion_rows = [protocol.base_row()]
        cells = [(g, s, m) for g in args.group_idxs for s in args.sparsities for m in args.methods]
        with tqdm(total=len(cells), desc=f"{args.model_name} {criterion}", unit="cell") as bar:
            criterion_rows += protocol.run_cells(cells, progress=bar.update)
        print(f"\n{args.model_name} / {args.dataset} / {criterion}")
        print(format_table(criterion_rows, args.methods))
        rows += criterion_rows
        if output:
            write_rows(output, rows)
    if loaded.test_accuracy is not None:
        print(f"checkpoint records {100 * loaded.test_accuracy:.2f}% test accuracy")
    if output:
        print(f"wrote {len(rows)} rows to {output}")
    return 0


def main(argv=None) -> int:
    return run_cli("main.py", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
