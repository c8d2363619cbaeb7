"""A small, seedable training loop shared by fine-tuning, gated and sparsity-loss training.

Batches are cut from uint8 tensors and augmented on the fly (crop + flip), as in the released
training pipeline; the learning rate follows a warm-up + cosine one-cycle schedule.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import DatasetInfo, ImageSet, normalize, random_crop_flip


def one_cycle_lr(peak: float, step: int, total: int, warmup_fraction: float = 0.15) -> float:
    warmup = max(1, int(warmup_fraction * total))
    if step < warmup:
        return peak * (0.1 + 0.9 * step / warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model: nn.Module, data: ImageSet, info: DatasetInfo, epochs: float, lr: float = 0.01,
          batch_size: int = 128, seed: int = 0, device="cpu", weight_decay: float = 5e-4,
          extra_loss=None, parameters=None, bf16: bool = False, progress: bool = False,
          adam_parameters=(), adam_lr: float = 0.05) -> list[float]:
    """Train `model` in place for `epochs` (fractions allowed) with SGD + nesterov, one-cycle lr.

    extra_loss(model) -> tensor is added to the cross-entropy (sparsity penalties);
    parameters: what SGD optimises (default: all but `adam_parameters`);
    adam_parameters: trained by Adam at `adam_lr`, no weight decay, same schedule. Gate scores go
    here: their penalty gradient (lambda * sigmoid') is far below weight decay, so SGD would not
    move them and a lambda sweep would show nothing. Returns the mean loss per epoch.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs!r}")
    device = torch.device(device)
    model.to(device).train()
    separate = {id(p) for p in adam_parameters}
    plain = [p for p in (parameters if parameters is not None else model.parameters()) if id(p) not in separate]
    optimizers = [(torch.optim.SGD(plain, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay), lr)]
    if separate:
        optimizers.append((torch.optim.Adam(list(adam_parameters), lr=adam_lr), adam_lr))
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    losses, running, count = [], 0.0, 0
    order = torch.randperm(len(data), generator=generator)
    bar = tqdm(range(total), unit="batch", disable=not progress, desc="training")
    for step in bar:
        position = step % steps_per_epoch
        if position == 0 and step > 0:
            order = torch.randperm(len(data), generator=generator)
        index = order[position * batch_size:(position + 1) * batch_size]
        images = normalize(random_crop_flip(data.images[index], generator), info).to(device)
        labels = data.labels[index].to(device)
        for optimizer, peak in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = one_cycle_lr(peak, step, total)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        for optimizer, _ in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer, _ in optimizers:
            optimizer.step()
        running, count = running + loss.item(), count + 1
        if position == steps_per_epoch - 1 or step == total - 1:
            losses.append(running / count)
            running, count = 0.0, 0
    model.eval()
    return losses
