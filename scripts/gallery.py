#!/usr/bin/env python
"""Train and evaluate the gallery of foreign-style models (torch_pruning_ext/experiments/gallery.py).

  scripts/gallery.py train NAME [--out DIR] [--epochs E] [--seed S] [--threads T]
  scripts/gallery.py eval NAME [--out DIR] [--threads T]
  scripts/gallery.py list

NAME is one of pitchnet, flatten_cnn, two_head. Training runs on CPU, saves DIR/NAME.resume after
every epoch (atomically) and continues from it when run again; the result is DIR/NAME.pt (state_dict,
metric, config, per-epoch history). DIR defaults to runs/gallery.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from torch_pruning_ext.experiments.cli import OneLineParser, choice, positive_int, run_cli  # noqa: E402
from torch_pruning_ext.experiments.gallery import GALLERY, gallery_entry, load_trained, train_entry  # noqa: E402
from torch_pruning_ext.files import check_writable_dir  # noqa: E402


def parse(argv):
    parser = OneLineParser(prog="gallery.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one gallery model (resumable)")
    evaluate = commands.add_parser("eval", help="print the metric of a trained gallery model")
    commands.add_parser("list", help="list the gallery models and their training recipes")
    for sub in (train, evaluate):
        sub.add_argument("name", type=choice(GALLERY, "gallery model"))
        sub.add_argument("--out", default="runs/gallery", help="checkpoint folder (default runs/gallery)")
        sub.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    train.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: the model's recipe)")
    train.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(args) -> int:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "list":
        for name, entry in GALLERY.items():
            print(f"{name}: {entry.metric_name}; {entry.recipe}")
        return 0
    if args.command == "train":
        check_writable_dir(args.out, "--out")
        train_entry(args.name, args.out, args.epochs, args.seed, log=lambda line: print(line, flush=True))
        return 0
    model, checkpoint = load_trained(args.name, args.out)
    entry = gallery_entry(args.name)
    metric = entry.metric(model)
    print(f"{args.name}: {entry.metric_name} {metric:.4f} "
          f"(stored {checkpoint['metric']:.4f}; config {checkpoint['config']})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("gallery.py", main, parse(sys.argv[1:])))
