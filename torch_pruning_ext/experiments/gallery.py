"""A gallery of small, trained models written the way third-party code writes them.

The library's own builders (models.py) follow its conventions; these do not, on purpose, so the
pruner can be tried on layouts it was not designed around:

* ``PitchNet``: a CREPE-style 1-D pitch estimator. Audio frames are viewed as (N, 1, 1024, 1)
  images, every block is ZeroPad2d -> Conv2d -> ReLU -> BatchNorm2d (after the activation) ->
  MaxPool2d -> Dropout, and the features are flattened *channels-last* (permute then reshape) into
  the classifier, as the original Keras model does. Trained here on synthetic harmonic tones.
* ``FlattenCNN``: a bare ``nn.Sequential`` (modules named "0" .. "8") ending in Flatten + Linear.
* ``TwoHeadNet``: a CNN whose forward returns a tuple ``(logits, embedding)``.

The image models use the project's Fashion-MNIST layout (3 x 32 x 32, see data.py). ``GALLERY``
maps each name to a ``GalleryEntry`` (builder, example input, calibration data, metric, training
recipe); ``train_entry`` trains one with a resumable, per-epoch checkpoint (scripts/gallery.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files import atomic_path
from ..modes import eval_mode
from .data import (CALIBRATION_POOL, ImageSet, dataset_info, load_split, normalize, random_crop_flip)

# --------------------------------------------------------------------------------------------
# Pitch: synthetic data, CREPE's 360 bins of 20 cents, decoding and raw pitch accuracy
# --------------------------------------------------------------------------------------------

SAMPLE_RATE = 16000
FRAME_LENGTH = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20.0
FIRST_BIN_CENTS = 1997.3794084376191  # CREPE's first bin, ~32.70 Hz (cents relative to 10 Hz)
BIN_CENTS = FIRST_BIN_CENTS + CENTS_PER_BIN * np.arange(PITCH_BINS)
TARGET_BLUR_CENTS = 25.0
F0_RANGE_HZ = (50.0, 1000.0)
MAX_HARMONICS = 8
RPA_THRESHOLD_CENTS = 50.0
# Seeds of the pitch data streams: training tones of epoch e are harmonic_tones(n, (PITCH_TRAIN_STREAM,
# seed, e)), calibration tones (PITCH_CALIBRATION_STREAM, seed), the test tones PITCH_TEST_SEED;
# the tuples differ in their first word, so no two streams share tones.
PITCH_TRAIN_STREAM, PITCH_CALIBRATION_STREAM = 1, 2
PITCH_TEST_SEED = (3, 0)
PITCH_TEST_SIZE = 2048


def harmonic_tones(n: int, seed: int | Sequence[int] = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` frames of 1024 samples at 16 kHz of random harmonic tones, and their f0 in Hz.

    f0 is log-uniform in [50, 1000] Hz; each tone has 1-8 harmonics below Nyquist (the fundamental
    always present) with amplitudes decaying as h**-slope times a random factor, random phases, a
    random gain and white noise 20-50 dB below the tone. Each frame is then normalised to zero mean
    and unit standard deviation, as CREPE normalises its input. Returns (frames float32 (n, 1024),
    f0 float32 (n,)); the same `seed` (an int or a tuple of ints) gives the same tones.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = np.random.default_rng(seed)
    low, high = np.log(F0_RANGE_HZ[0]), np.log(F0_RANGE_HZ[1])
    f0 = np.exp(rng.uniform(low, high, n))
    count = rng.integers(1, MAX_HARMONICS + 1, n)
    slope = rng.uniform(0.5, 2.0, n)
    gain = np.exp(rng.uniform(np.log(0.05), np.log(1.0), n))
    snr_db = rng.uniform(20.0, 50.0, n)
    t = np.arange(FRAME_LENGTH, dtype=np.float64) / SAMPLE_RATE
    frames = np.zeros((n, FRAME_LENGTH), dtype=np.float64)
    for h in range(1, MAX_HARMONICS + 1):
        amplitude = np.ones(n) if h == 1 else rng.uniform(0.3, 1.0, n) * h ** -slope
        phase = rng.uniform(0.0, 2 * np.pi, n)
        present = (h <= count) & (h * f0 < SAMPLE_RATE / 2)
        amplitude = np.where(present, amplitude, 0.0)
        frames += amplitude[:, None] * np.sin(2 * np.pi * h * f0[:, None] * t[None, :] + phase[:, None])
    frames *= gain[:, None]
    power = frames.var(axis=1)
    noise_std = np.sqrt(power / 10 ** (snr_db / 10))
    frames += noise_std[:, None] * rng.standard_normal((n, FRAME_LENGTH))
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= np.clip(frames.std(axis=1, keepdims=True), 1e-8, None)
    return torch.from_numpy(frames.astype(np.float32)), torch.from_numpy(f0.astype(np.float32))


def cents_of(f0) -> torch.Tensor:
    """Frequency in Hz -> cents relative to 10 Hz (CREPE's scale)."""
    f0 = torch.as_tensor(f0, dtype=torch.float64)
    return 1200.0 * torch.log2(f0 / 10.0)


def hz_of(cents) -> torch.Tensor:
    """Cents relative to 10 Hz -> frequency in Hz."""
    return 10.0 * 2.0 ** (torch.as_tensor(cents, dtype=torch.float64) / 1200.0)


def pitch_targets(f0, blur_cents: float = TARGET_BLUR_CENTS) -> torch.Tensor:
    """(n,) f0 in Hz -> (n, 360) float32 targets: a Gaussian (std `blur_cents`, peak 1) over the bins."""
    diff = torch.as_tensor(BIN_CENTS)[None, :] - cents_of(f0).reshape(-1, 1)
    return torch.exp(-diff ** 2 / (2 * blur_cents ** 2)).float()


def decode_cents(activations) -> torch.Tensor:
    """(n, 360) or (360,) bin activations -> pitch in cents, as CREPE decodes.

    The weighted average of the bin centres in a window of +-4 bins around the argmax, weighted by
    the activations there.
    """
    act = torch.as_tensor(activations, dtype=torch.float64)
    single = act.dim() == 1
    act = act.reshape(-1, PITCH_BINS)
    centre = act.argmax(dim=1)
    offsets = torch.arange(-4, 5)
    index = centre[:, None] + offsets[None, :]
    inside = (index >= 0) & (index < PITCH_BINS)
    index = index.clamp(0, PITCH_BINS - 1)
    weights = act.gather(1, index) * inside
    cents = torch.as_tensor(BIN_CENTS)[index]
    total = weights.sum(dim=1)
    out = torch.where(total > 0, (weights * cents).sum(dim=1) / total.clamp_min(1e-12), cents[:, 4])
    return out[0] if single else out


def _outputs(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's first output on `inputs`, in eval mode, batch by batch (train mode restored)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            result = model(inputs[start:start + batch_size])
            out.append(result[0] if isinstance(result, (tuple, list)) else result)
    return torch.cat(out) if out else torch.empty(0)


def pitch_accuracy(model: nn.Module, frames: torch.Tensor, f0, batch_size: int = 256) -> float:
    """Raw pitch accuracy: fraction of frames whose decoded pitch is within 50 cents of the truth."""
    if frames.shape[0] == 0:
        raise ValueError("cannot compute pitch accuracy on no frames")
    error = (decode_cents(_outputs(model, frames, batch_size)) - cents_of(f0)).abs()
    return (error <= RPA_THRESHOLD_CENTS).double().mean().item()


def pitch_test_set(n: int = PITCH_TEST_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed test tones (seed PITCH_TEST_SEED, no overlap with training or calibration tones)."""
    return harmonic_tones(n, PITCH_TEST_SEED)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

NARROW_CHANNELS = (128, 16, 16, 16, 32, 64)
WIDE_CHANNELS = (1024, 128, 128, 128, 256, 512)  # CREPE "full" (capacity 32), ~22M parameters


def _same_padding(length: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """Keras 'same' padding along one axis: (top, bottom, output length); the extra pixel goes last."""
    out = math.ceil(length / stride)
    total = max((out - 1) * stride + kernel - length, 0)
    return total // 2, total - total // 2, out


class PitchNet(nn.Module):
    """CREPE-style pitch estimator: (B, 1024) audio frames -> (B, bins) sigmoid activations."""

    def __init__(self, capacity_channels: Sequence[int] = NARROW_CHANNELS, bins: int = PITCH_BINS):
        super().__init__()
        if len(capacity_channels) != 6:
            raise ValueError(f"PitchNet has 6 conv layers, got {len(capacity_channels)} channel counts")
        self.capacity_channels = tuple(int(c) for c in capacity_channels)
        kernels = [(512, 4)] + [(64, 1)] * 5
        length, in_channels = FRAME_LENGTH, 1
        for i, (channels, (kernel, stride)) in enumerate(zip(self.capacity_channels, kernels), start=1):
            top, bottom, length = _same_padding(length, kernel, stride)
            setattr(self, f"pad{i}", nn.ZeroPad2d((0, 0, top, bottom)))
            setattr(self, f"conv{i}", nn.Conv2d(in_channels, channels, (kernel, 1), stride=(stride, 1)))
            setattr(self, f"relu{i}", nn.ReLU())
            setattr(self, f"bn{i}", nn.BatchNorm2d(channels))
            setattr(self, f"pool{i}", nn.MaxPool2d((2, 1)))
            setattr(self, f"drop{i}", nn.Dropout(0.25))
            length //= 2
            in_channels = channels
        self.in_features = in_channels * length * 1
        self.classifier = nn.Linear(self.in_features, bins)

    def forward(self, x):
        x = x.view(-1, 1, 1024, 1)
        for i in range(1, 7):
            x = getattr(self, f"pad{i}")(x)
            x = getattr(self, f"conv{i}")(x)
            x = getattr(self, f"relu{i}")(x)
            x = getattr(self, f"bn{i}")(x)
            x = getattr(self, f"pool{i}")(x)
            x = getattr(self, f"drop{i}")(x)
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


def pitchnet_wide() -> PitchNet:
    """The full-size CREPE layout (~22M parameters): for timing with random weights only."""
    return PitchNet(WIDE_CHANNELS)


def FlattenCNN(num_classes: int = 10) -> nn.Sequential:  # noqa: N802 (a class-like builder)
    """A plain nn.Sequential of nine modules ("0" .. "8") for 3 x 32 x 32 input: Conv-BN-ReLU,
    Conv-BN-ReLU-MaxPool, Flatten (64 channels x 8 x 8, channel-major) and Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, num_classes))


class TwoHeadNet(nn.Module):
    """A CNN returning (logits, embedding): class scores and a 32-dim projection of pooled features."""

    def __init__(self, num_classes: int = 10, embedding_dim: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(128, num_classes)
        self.embed = nn.Linear(128, embedding_dim)

    def forward(self, x):
        pooled = torch.flatten(self.pool(self.features(x)), 1)
        return self.head(pooled), self.embed(pooled)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (the project's 3 x 32 x 32 layout)
# --------------------------------------------------------------------------------------------

FASHION = dataset_info("fashion-mnist")
_CACHE: dict[str, ImageSet] = {}


def fashion_split(split: str) -> ImageSet:
    """Fashion-MNIST as uint8 (N, 3, 32, 32), offline: the full set where data.py finds one, else the
    bundled copy (the full test set and the first 2048 training images). Never downloads."""
    if split not in _CACHE:
        _CACHE[split] = load_split("fashion-mnist", split, allow_bundled=True, download=False)
    return _CACHE[split]


def fashion_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> normalised float32 model input."""
    return normalize(images, FASHION)


def classification_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                            batch_size: int = 256) -> float:
    """Top-1 accuracy; a model returning a tuple is scored on its first output (the logits)."""
    if inputs.shape[0] == 0:
        raise ValueError("cannot compute accuracy on an empty data set")
    return (_outputs(model, inputs, batch_size).argmax(dim=1) == labels).double().mean().item()


def fashion_test_accuracy(model: nn.Module, batch_size: int = 256) -> float:
    """Accuracy on the full Fashion-MNIST test set (10000 images)."""
    test = fashion_split("test")
    return classification_accuracy(model, fashion_inputs(test.images), test.labels, batch_size)


def fashion_calibration(count: int, seed: int = 0) -> torch.Tensor:
    """`count` normalised images drawn (seeded, without augmentation) from the first 2048 training images."""
    pool = fashion_split("train").subset(CALIBRATION_POOL)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    index = order[torch.arange(count) % len(pool)]
    return fashion_inputs(pool.images[index])


def pitch_calibration(count: int, seed: int = 0) -> torch.Tensor:
    """`count` frames of fresh tones from the calibration stream (not training nor test tones)."""
    return harmonic_tones(count, (PITCH_CALIBRATION_STREAM, seed))[0]


def pitch_test_accuracy(model: nn.Module, batch_size: int = 256) -> float:
    frames, f0 = pitch_test_set()
    return pitch_accuracy(model, frames, f0, batch_size)


# --------------------------------------------------------------------------------------------
# Training recipes: per epoch, a fixed number of samples drawn from the seed and the epoch
# --------------------------------------------------------------------------------------------

def _pitch_batches(samples: int, batch_size: int, seed: int, epoch: int):
    frames, f0 = harmonic_tones(samples, (PITCH_TRAIN_STREAM, seed, epoch))
    targets = pitch_targets(f0)
    for start in range(0, samples, batch_size):
        yield frames[start:start + batch_size], targets[start:start + batch_size]


def _pitch_loss(model, inputs, targets):
    return F.binary_cross_entropy(model(inputs), targets)


def _fashion_batches(samples: int, batch_size: int, seed: int, epoch: int):
    """Crop (pad 2) + flip augmented batches; an epoch cycles seeded permutations of the training set."""
    data = fashion_split("train")
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    passes = math.ceil(samples / len(data))
    order = torch.cat([torch.randperm(len(data), generator=generator) for _ in range(passes)])[:samples]
    for start in range(0, samples, batch_size):
        index = order[start:start + batch_size]
        images = random_crop_flip(data.images[index], generator, padding=2)
        yield fashion_inputs(images), data.labels[index]


def _classification_loss(model, inputs, labels):
    return F.cross_entropy(model(inputs), labels)


def _two_head_loss(model, inputs, labels, weight: float = 0.1, temperature: float = 0.2):
    """Cross-entropy on the logits plus `weight` x a supervised contrastive term on the embedding:
    every sample's cosine neighbours in the batch should be of its own class."""
    logits, embedding = model(inputs)
    z = F.normalize(embedding, dim=1)
    similarity = z @ z.t() / temperature
    eye = torch.eye(len(labels), dtype=torch.bool)
    similarity = similarity.masked_fill(eye, -1e9)
    same = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    has_pair = same.any(dim=1)
    contrast = -(log_prob * same).sum(dim=1)[has_pair] / same.sum(dim=1)[has_pair]
    term = contrast.mean() if has_pair.any() else logits.new_zeros(())
    return F.cross_entropy(logits, labels) + weight * term


@dataclass(frozen=True)
class Recipe:
    """How a gallery model is trained: Adam with cosine decay to 0 over all steps."""
    epochs: int
    samples_per_epoch: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0


@dataclass(frozen=True)
class GalleryEntry:
    """One gallery model: `build()` a fresh (untrained) model, `example_input()` a batch of 2 for
    tracing, `calibration(count, seed)` model-ready inputs, `metric(model)` its test score."""
    name: str
    build: Callable[[], nn.Module]
    example_input: Callable[[], torch.Tensor]
    calibration: Callable[[int, int], torch.Tensor]
    metric: Callable[[nn.Module], float]
    metric_name: str
    recipe: Recipe
    batches: Callable = field(repr=False)  # (samples, batch_size, seed, epoch) -> (inputs, targets) batches
    loss: Callable = field(repr=False)     # (model, inputs, targets) -> scalar training loss


GALLERY: dict[str, GalleryEntry] = {
    "pitchnet": GalleryEntry(
        "pitchnet", lambda: PitchNet(NARROW_CHANNELS), lambda: pitch_calibration(2, 12345), pitch_calibration,
        pitch_test_accuracy, "raw pitch accuracy (2048 test tones)",
        Recipe(epochs=8, samples_per_epoch=8192, batch_size=64, lr=1e-3), _pitch_batches, _pitch_loss),
    "flatten_cnn": GalleryEntry(
        "flatten_cnn", FlattenCNN, lambda: fashion_calibration(2, 12345), fashion_calibration,
        fashion_test_accuracy, "Fashion-MNIST test accuracy",
        Recipe(epochs=10, samples_per_epoch=8192, batch_size=64, lr=2e-3, weight_decay=1e-4),
        _fashion_batches, _classification_loss),
    "two_head": GalleryEntry(
        "two_head", TwoHeadNet, lambda: fashion_calibration(2, 12345), fashion_calibration,
        fashion_test_accuracy, "Fashion-MNIST test accuracy",
        Recipe(epochs=12, samples_per_epoch=8192, batch_size=64, lr=3e-3, weight_decay=1e-4),
        _fashion_batches, _two_head_loss),
}


def gallery_entry(name: str) -> GalleryEntry:
    if name not in GALLERY:
        raise ValueError(f"unknown gallery model {name!r}; choose from {', '.join(GALLERY)}")
    return GALLERY[name]


# --------------------------------------------------------------------------------------------
# Resumable training and checkpoints
# --------------------------------------------------------------------------------------------

def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def checkpoint_path(name: str, out_dir: str | Path) -> Path:
    return Path(out_dir) / f"{name}.pt"


def resume_path(name: str, out_dir: str | Path) -> Path:
    return Path(out_dir) / f"{name}.resume"


def train_entry(name: str, out_dir: str | Path = "runs/gallery", epochs: int | None = None, seed: int = 0,
                log: Callable[[str], None] = print) -> dict:
    """Train gallery model `name`; return the final checkpoint dict (also written to DIR/NAME.pt).

    After every epoch the model, optimiser and progress are saved atomically to DIR/NAME.resume; a
    later call with the same configuration continues from the last finished epoch (the data and the
    dropout noise of an epoch depend only on seed and epoch, so a resumed run equals an unbroken one).
    A finished checkpoint of the same configuration is returned without training.
    """
    entry = gallery_entry(name)
    recipe = entry.recipe if epochs is None else Recipe(**{**asdict(entry.recipe), "epochs": int(epochs)})
    if recipe.epochs < 1:
        raise ValueError(f"epochs must be positive, got {recipe.epochs}")
    config = {"name": name, "seed": int(seed), **asdict(recipe)}
    final, resume = checkpoint_path(name, out_dir), resume_path(name, out_dir)
    if final.is_file():
        done = torch.load(final, map_location="cpu", weights_only=False)
        if done.get("config") == config:
            log(f"{name}: already trained ({final}): {entry.metric_name} {done['metric']:.4f}")
            return done
    torch.manual_seed(seed)  # the initial weights
    model = entry.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(recipe.samples_per_epoch / recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    start_epoch, elapsed, history = 0, 0.0, []
    if resume.is_file():
        state = torch.load(resume, map_location="cpu", weights_only=False)
        if state.get("config") == config:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, elapsed, history = state["epoch"], state["elapsed_s"], state["history"]
            log(f"{name}: resuming after epoch {start_epoch}/{recipe.epochs} ({resume})")
        else:
            log(f"{name}: {resume} is of another configuration; starting over")
    for epoch in range(start_epoch, recipe.epochs):
        began = time.perf_counter()
        torch.manual_seed(seed * 100003 + epoch)  # dropout noise of this epoch
        model.train()
        running, count = 0.0, 0
        for step, (inputs, targets) in enumerate(
                entry.batches(recipe.samples_per_epoch, recipe.batch_size, seed, epoch)):
            progress = (epoch * steps_per_epoch + step) / total_steps
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))
            loss = entry.loss(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running, count = running + loss.item(), count + 1
        train_s = time.perf_counter() - began
        metric = entry.metric(model)
        elapsed += time.perf_counter() - began
        history.append({"epoch": epoch + 1, "loss": running / max(count, 1), "metric": metric})
        log(f"{name}: epoch {epoch + 1}/{recipe.epochs} loss {running / max(count, 1):.4f} "
            f"{entry.metric_name} {metric:.4f} (train {train_s:.1f} s, total {elapsed:.1f} s)")
        _save({"config": config, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
               "epoch": epoch + 1, "elapsed_s": elapsed, "history": history}, resume)
    model.eval()
    metric = history[-1]["metric"]
    result = {"config": config, "state_dict": model.state_dict(), "metric": metric,
              "metric_name": entry.metric_name, "history": history, "train_seconds": elapsed,
              "torch": torch.__version__}
    _save(result, final)
    if resume.is_file():
        resume.unlink()
    log(f"{name}: wrote {final}: {entry.metric_name} {metric:.4f} in {elapsed:.1f} s")
    return result


def load_trained(name: str, out_dir: str | Path = "runs/gallery") -> tuple[nn.Module, dict]:
    """The trained model of DIR/NAME.pt (in eval mode) and its checkpoint dict."""
    entry = gallery_entry(name)
    path = checkpoint_path(name, out_dir)
    if not path.is_file():
        raise ValueError(f"no checkpoint {path}; train it with: scripts/gallery.py train {name}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = entry.build()
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint
