#!/usr/bin/env python
"""Train the small byte-level language model (a Hugging Face LLaMA with grouped-query attention) on the
fortunes corpus (experiments/text.py says what it is and how to get it).

AdamW, linear warm-up then cosine decay, random windows of 128 bytes. Resumable: the state is kept in
OUTPUT.resume every --save-every steps and picked up by rerunning the same command. The checkpoint
holds the model's state dict, its config and the validation perplexity.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from torch_pruning_ext.experiments.cli import OneLineParser  # noqa: E402
from torch_pruning_ext.experiments.data import DatasetUnavailable  # noqa: E402
from torch_pruning_ext.experiments.text import (LM_CONFIG, build_language_model, consecutive_windows,  # noqa: E402
                                                load_corpus, perplexity, windows)
from torch_pruning_ext.files import atomic_torch_save  # noqa: E402
from torch_pruning_ext.inputs import tensors_of  # noqa: E402

VALIDATION_WINDOWS = 256  # windows of the held-out text the progress lines report on


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="checkpoint file to write")
    parser.add_argument("--text-dir", default=None, help="folder of fortune files (default /usr/share/games/fortunes)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=100)
    args = parser.parse_args(argv)
    for key in ("steps", "batch_size", "save_every"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def learning_rate(peak: float, step: int, steps: int) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train, validation = load_corpus(args.text_dir)
    except DatasetUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    held_out = consecutive_windows(validation, limit=VALIDATION_WINDOWS)
    torch.manual_seed(args.seed)
    model = build_language_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    output = Path(args.output)
    resume = output.with_name(output.name + ".resume")
    start, history = 0, []
    if resume.exists():
        state = torch.load(resume, weights_only=False)
        if state["args"] != vars(args):
            print(f"error: {resume} was written by a different command; delete it to start over", file=sys.stderr)
            return 2
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        print(f"resuming from step {start}")
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(start):  # the same batches as an uninterrupted run
        windows(train, args.batch_size, generator=generator)
    model.train()
    started, total = time.time(), 0.0
    bar = tqdm(range(start, args.steps), desc="training", unit="step", mininterval=0.5 if sys.stderr.isatty() else 60)
    for step in bar:
        batch = windows(train, args.batch_size, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, step, args.steps)
        logits = tensors_of(model(input_ids=batch[:, :-1]))[0]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            entry = {"step": step + 1, "train_loss": total / args.save_every,
                     "validation_perplexity": perplexity(model, held_out), "seconds": time.time() - started}
            model.train()
            history.append(entry)
            total = 0.0
            print(f"step {entry['step']}: train loss {entry['train_loss']:.4f}, validation perplexity "
                  f"{entry['validation_perplexity']:.3f}", flush=True)
            atomic_torch_save({"args": vars(args), "step": step + 1, "history": history,
                               "model_state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, resume)
    model.eval()
    final = perplexity(model, consecutive_windows(validation))
    atomic_torch_save({"model_state_dict": {k: v.detach().contiguous() for k, v in model.state_dict().items()},
                       "config": LM_CONFIG, "validation_perplexity": final,
                       "metadata": {"model": "llama_bytes", "corpus": "fortunes", "steps": args.steps,
                                    "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                                    "history": history}}, output)
    print(f"wrote {output}: validation perplexity {final:.3f} (bytes) after {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
