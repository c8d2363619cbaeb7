#!/usr/bin/env python
"""Train the CIFAR-style VGG11-BN / ResNet18 / small ViT on cifar10, cifar100 or fashion-mnist.

Writes a checkpoint in the released format ({"model_state_dict", "test_accuracy", "epoch"}) plus a
"metadata" entry (model, dataset, num_classes, normalisation, recipe). Resumable: the state after
each finished epoch is kept in OUTPUT.resume and picked up by rerunning the same command.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from torch_pruning_ext.experiments.data import (DATASETS, DatasetUnavailable, dataset_info, load_split, normalize,
                                    random_crop_flip)
from torch_pruning_ext.experiments.evaluation import accuracy
from torch_pruning_ext.files import atomic_torch_save
from torch_pruning_ext.experiments.models import MODEL_BUILDERS, build_model

RECIPES = {
    # The released recipe: SGD momentum 0.9, lr 0.05 halved every 30 epochs, 300 epochs, batch 128.
    "paper": dict(epochs=300, lr=0.05, weight_decay=5e-4, batch_size=128, schedule="step30"),
    # A CPU-sized recipe: one-cycle cosine schedule over a few epochs.
    "short": dict(epochs=10, lr=0.1, weight_decay=5e-4, batch_size=128, schedule="onecycle"),
    # Transformers train with AdamW, a smaller peak rate and more weight decay.
    "vit": dict(epochs=10, lr=2e-3, weight_decay=0.05, batch_size=128, schedule="onecycle", optimizer="adamw"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", "--model_name", required=True, choices=sorted(MODEL_BUILDERS))
    parser.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    parser.add_argument("--data-dir", "--data_dir", default=None)
    parser.add_argument("--recipe", default="short", choices=sorted(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's (peak) learning rate")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster on recent CPUs)")
    parser.add_argument("--output", required=True, help="checkpoint file to write")
    args = parser.parse_args(argv)
    recipe = dict(RECIPES[args.recipe])
    for key in ("epochs", "lr", "batch_size"):
        if getattr(args, key) is not None:
            if getattr(args, key) <= 0:
                parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
            recipe[key] = getattr(args, key)
    args.recipe_settings = recipe
    return args


def learning_rate(recipe: dict, step: int, steps_per_epoch: int) -> float:
    if recipe["schedule"] == "step30":
        return recipe["lr"] * 0.5 ** (step // steps_per_epoch // 30)
    total = recipe["epochs"] * steps_per_epoch
    warmup = max(1, int(0.15 * total))
    if step < warmup:
        return recipe["lr"] * (0.1 + 0.9 * step / warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return recipe["lr"] * 0.5 * (1 + math.cos(math.pi * progress))


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = args.recipe_settings
    info = dataset_info(args.dataset)
    device = torch.device(args.device)
    try:
        train = load_split(args.dataset, "train", args.data_dir, allow_bundled=False)
        test = load_split(args.dataset, "test", args.data_dir)
    except DatasetUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    test_inputs = normalize(test.images, info)

    torch.manual_seed(args.seed)
    model = build_model(args.model_name, info.num_classes).to(device).to(memory_format=torch.channels_last)
    if recipe.get("optimizer") == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9,
                                    weight_decay=recipe["weight_decay"], nesterov=recipe["schedule"] == "onecycle")
    output = Path(args.output)
    resume_path = output.with_name(output.name + ".resume")
    start_epoch, history = 0, []
    if resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=False)
        if state["args"] != vars(args) | {"recipe_settings": recipe}:
            print(f"error: {resume_path} was written by a different command; delete it to start over",
                  file=sys.stderr)
            return 2
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        print(f"resuming from epoch {start_epoch}")

    batch_size = recipe["batch_size"]
    steps_per_epoch = math.ceil(len(train) / batch_size)
    for epoch in range(start_epoch, recipe["epochs"]):
        model.train()
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        order = torch.randperm(len(train), generator=generator)
        started, total_loss = time.time(), 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{recipe['epochs']}", unit="batch",
                   mininterval=0.5 if sys.stderr.isatty() else 60)
        for step in bar:
            index = order[step * batch_size:(step + 1) * batch_size]
            images = normalize(random_crop_flip(train.images[index], generator), info)
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            labels = train.labels[index].to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, epoch * steps_per_epoch + step, steps_per_epoch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            bar.set_postfix(loss=f"{total_loss / (step + 1):.4f}", refresh=False)
        test_acc = accuracy(model, test_inputs, test.labels, device=device)
        history.append({"epoch": epoch + 1, "train_loss": total_loss / steps_per_epoch,
                        "test_accuracy": test_acc, "seconds": time.time() - started})
        print(f"epoch {epoch + 1}: train loss {total_loss / steps_per_epoch:.4f}, "
              f"test accuracy {100 * test_acc:.2f}%", flush=True)
        atomic_torch_save({"args": vars(args) | {"recipe_settings": recipe}, "epoch": epoch + 1,
                           "history": history, "model_state_dict": model.state_dict(),
                           "optimizer": optimizer.state_dict()}, resume_path)

    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Record the accuracy exactly as main.py measures it: a fresh fp32 model through evaluation.accuracy.
    plain = build_model(args.model_name, info.num_classes)
    plain.load_state_dict(state_dict)
    final_acc = accuracy(plain, test_inputs, test.labels)
    metadata = {"model": args.model_name, "dataset": args.dataset, "num_classes": info.num_classes,
                "normalization": {"mean": list(info.mean), "std": list(info.std)},
                "recipe": {"name": args.recipe, **recipe, "seed": args.seed, "bf16": args.bf16},
                "history": history}
    atomic_torch_save({"model_state_dict": state_dict, "test_accuracy": final_acc,
                       "epoch": recipe["epochs"], "metadata": metadata}, output)
    print(f"wrote {output}: test accuracy {100 * final_acc:.2f}% after {recipe['epochs']} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
