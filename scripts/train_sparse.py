#!/usr/bin/env python
"""Sparsity during or after training, starting from a trained checkpoint:

  gates      channel (or, with --unstructured, per-weight) gates with loss + lambda * sum(gates),
             one run per --lambdas value; gates folded into the weights, channel gates saved for
             the "gate" criterion; accuracy, sparsity (gates < 0.01) and a gate histogram per lambda
  asl        adaptive sparsity loss: trainable magnitude thresholds pushed to --starget
  magnitude  global unstructured magnitude pruning at --sparsities, with and without retraining

Every run appends a row (accuracy and memory footprint) to OUT_DIR/summary.csv.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from torch_pruning_ext.experiments.checkpoints import load_model, resolve_checkpoint  # noqa: E402
from torch_pruning_ext.experiments.cli import OneLineParser, run_cli, sparsity  # noqa: E402
from torch_pruning_ext.experiments.data import DATASETS, dataset_info, load_split, normalize  # noqa: E402
from torch_pruning_ext.experiments.evaluation import accuracy  # noqa: E402
from torch_pruning_ext.files import atomic_path, atomic_torch_save, atomic_write_text  # noqa: E402
from torch_pruning_ext.experiments.footprint import footprint  # noqa: E402
from torch_pruning_ext.experiments.models import MODEL_BUILDERS  # noqa: E402
from torch_pruning_ext.experiments.results import write_rows  # noqa: E402
from torch_pruning_ext.experiments.sparse_training import (ASL_MODES, add_gates, add_thresholds, fold_parametrizations,  # noqa: E402
                                               gate_penalty, gate_values, layer_sparsity, sparsity_loss)
from torch_pruning_ext.experiments.training import train  # noqa: E402
from torch_pruning_ext.experiments.unstructured import global_magnitude_prune, make_permanent, weight_sparsity  # noqa: E402

CLOSED = 0.01  # a gate below this counts as pruned
SUMMARY_FIELDS = ("model", "dataset", "method", "setting", "accuracy")


def summary_key(row: dict) -> tuple:
    return tuple(str(row.get(k, "")) for k in SUMMARY_FIELDS[:4])


def save_summary(out: Path, rows: list[dict]) -> None:
    write_rows(out / "summary.csv", rows, key=summary_key, first_fields=SUMMARY_FIELDS)


def build_parser():
    parser = OneLineParser(prog="train_sparse.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("method", choices=["gates", "asl", "magnitude"])
    add("--model-name", default="vgg11_bn", choices=sorted(MODEL_BUILDERS))
    add("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    add("--data-dir", default=None)
    add("--checkpoint", default=None, help="starting checkpoint (default: the shipped one)")
    add("--out-dir", required=True)
    add("--epochs", type=float, default=2, help="training epochs per run (fractions allowed)")
    add("--lr", type=float, default=0.01)
    add("--seed", type=int, default=0)
    add("--device", default="cpu")
    add("--bf16", action="store_true")
    add("--lambdas", nargs="+", type=float, default=[1e-5, 5e-5, 1e-4])
    add("--unstructured", action="store_true", help="gates per weight instead of per output channel")
    add("--gate-lr", type=float, default=0.05, help="gates: Adam learning rate of the gate scores")
    add("--starget", type=float, default=0.9, help="asl: requested sparsity")
    add("--lv", type=float, default=1.0, help="asl: weight of the sparsity loss")
    add("--asl-mode", choices=ASL_MODES, default="adaptive")
    add("--pthres", type=int, default=1000, help="asl: only layers with at least this many weights")
    add("--threshold-lr", type=float, default=5e-4, help="asl: Adam learning rate of the thresholds")
    add("--sparsities", nargs="+", type=sparsity, default=[0.5, 0.7, 0.9])
    add("--retrain-epochs", type=float, default=0, help="magnitude: retraining with fixed masks")
    return parser


def summary_row(args, method: str, setting: str, model, test_inputs, labels, extra=None) -> dict:
    size = footprint(model, test_inputs[:1])
    return {"model": args.model_name, "dataset": args.dataset, "method": method, "setting": setting,
            "accuracy": round(100 * accuracy(model, test_inputs, labels), 4), "params": size.params,
            "nonzero_params": size.nonzero_params, "weight_sparsity": round(weight_sparsity(model), 6),
            "dense_bytes": size.dense_bytes, "sparse_bytes": size.sparse_bytes,
            "peak_activation_bytes": size.peak_activation_bytes} | (extra or {})


def histogram(values: torch.Tensor, title: str, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5, 3))
    axis.hist(values.numpy(), bins=50, range=(0, 1))
    axis.set_xlabel("gate value sigmoid(score)")
    axis.set_ylabel("count")
    axis.set_yscale("log")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


def run(args) -> int:
    out = Path(args.out_dir)
    info = dataset_info(args.dataset)
    loaded = load_model(resolve_checkpoint(args.model_name, args.dataset, args.checkpoint, ROOT), args.model_name,
                        args.dataset, info.num_classes)
    train_set = load_split(args.dataset, "train", args.data_dir)
    test = load_split(args.dataset, "test", args.data_dir)
    inputs = normalize(test.images, info)
    common = dict(lr=args.lr, seed=args.seed, device=args.device, bf16=args.bf16, progress=sys.stderr.isatty())
    rows = []
    if args.method == "gates":
        for lam in args.lambdas:
            model = copy.deepcopy(loaded.model)
            classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
            scores = add_gates(model, structured=not args.unstructured, ignored=[classifier],
                               example_inputs=inputs[:1])
            train(model, train_set, info, args.epochs, extra_loss=lambda m, lam=lam: lam * gate_penalty(m),
                  adam_parameters=scores, adam_lr=args.gate_lr, **common)
            model.cpu()
            gates = gate_values(model)
            every = torch.cat([v.flatten() for v in gates.values()])
            fold_parametrizations(model)
            kind = "weight" if args.unstructured else "channel"
            histogram(every, f"{args.model_name} {kind} gates, lambda={lam:g}", out / f"gates_{kind}_{lam:g}.png")
            row = summary_row(args, f"gates ({kind})", f"lambda={lam:g}", model, inputs, test.labels,
                              {"gate_sparsity": round(float((every < CLOSED).float().mean()), 6)})
            atomic_torch_save({"model_state_dict": model.state_dict(), "test_accuracy": row["accuracy"] / 100,
                               "epoch": args.epochs, "gates": {} if args.unstructured else gates,
                               "metadata": loaded.metadata | {"model": args.model_name, "dataset": args.dataset,
                                                              "num_classes": info.num_classes,
                                                              "gates": {"lambda": lam, "kind": kind}}},
                              out / f"{args.model_name}_gates_{kind}_{lam:g}.checkpoint")
            rows.append(row)
            print(f"lambda={lam:g}: accuracy {row['accuracy']:.2f}%, gates below {CLOSED}: "
                  f"{100 * row['gate_sparsity']:.1f}%", flush=True)
            save_summary(out, rows)
    elif args.method == "asl":
        model = copy.deepcopy(loaded.model)
        attached = add_thresholds(model, args.pthres)
        if not attached:
            raise ValueError(f"no layer has at least --pthres {args.pthres} weights")
        # Adam moves every threshold at a bounded rate: plain SGD on the sparsity loss pushed whole
        # layers past their largest weight in a few steps (all-zero layers, a dead network)
        train(model, train_set, info, args.epochs,
              extra_loss=lambda m: args.lv * sparsity_loss(attached, args.starget, args.asl_mode),
              adam_parameters=[t.threshold for _, t in attached], adam_lr=args.threshold_lr, **common)
        model.cpu()
        fold_parametrizations(model)
        per_layer = layer_sparsity(model)
        row = summary_row(args, f"adaptive sparsity loss ({args.asl_mode})", f"starget={args.starget:g}", model,
                          inputs, test.labels)
        rows.append(row)
        atomic_write_text(out / f"asl_{args.asl_mode}_{args.starget:g}_layers.csv",
                          "layer,sparsity\n" + "".join(f"{k},{v:.6f}\n" for k, v in per_layer.items()))
        atomic_torch_save({"model_state_dict": model.state_dict(), "test_accuracy": row["accuracy"] / 100,
                           "epoch": args.epochs, "metadata": loaded.metadata},
                          out / f"{args.model_name}_asl_{args.asl_mode}_{args.starget:g}.checkpoint")
        print(f"asl: accuracy {row['accuracy']:.2f}%, overall weight sparsity {100 * row['weight_sparsity']:.1f}%")
        save_summary(out, rows)
    else:
        for level in args.sparsities:
            pruned = copy.deepcopy(loaded.model)
            global_magnitude_prune(pruned, level)
            make_permanent(pruned)
            rows.append(summary_row(args, "global magnitude", f"s={level:g}", pruned, inputs, test.labels))
            if args.retrain_epochs > 0:
                model = copy.deepcopy(loaded.model)
                global_magnitude_prune(model, level)  # the same masks, kept attached while retraining
                train(model, train_set, info, args.retrain_epochs, **common)
                model.cpu()
                make_permanent(model)
                rows.append(summary_row(args, "global magnitude + retraining", f"s={level:g}", model, inputs,
                                        test.labels, {"retrain_epochs": args.retrain_epochs}))
            print("; ".join(f"{r['method']} {r['setting']}: {r['accuracy']:.2f}%" for r in rows[-2:]), flush=True)
            save_summary(out, rows)
    print(f"wrote {out / 'summary.csv'}")
    return 0


def main(argv=None) -> int:
    return run_cli("train_sparse.py", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
