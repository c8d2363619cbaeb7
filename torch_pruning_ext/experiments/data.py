"""Datasets as uint8 tensors of shape (N, 3, 32, 32), normalised in one vectorised step.

Decoding once into tensors (instead of a PIL pipeline per sample) is what makes evaluating many
pruned copies cheap. Fashion-MNIST is fed to the CIFAR architectures by zero-padding 2 pixels on
each side and repeating the gray channel three times (the project's convention).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ..checks import check_choice


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# CIFAR uses the normalisation of the released code: ImageNet's mean and std, not CIFAR's own.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, IMAGENET_MEAN, IMAGENET_STD),
    "cifar100": DatasetInfo("cifar100", 100, IMAGENET_MEAN, IMAGENET_STD),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (0.2860,) * 3, (0.3530,) * 3),
}
SPLITS = ("train", "test")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_FASHION_MNIST = Path(__file__).with_name("bundled") / "fashion_mnist_eval.npz"
# The bundled training subset is the first CALIBRATION_POOL training images, so importance batches
# drawn from it are the same whether the full training set is present or not.
CALIBRATION_POOL = 2048


class DatasetUnavailable(RuntimeError):
    """The data set is not on disk and could not be downloaded; the message says where to put it."""


@dataclass
class ImageSet:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, count: int) -> "ImageSet":
        return ImageSet(self.images[:count], self.labels[:count])


def dataset_info(name: str) -> DatasetInfo:
    check_choice(name, DATASETS, "dataset")
    return DATASETS[name]


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with the data set's per-channel mean and std."""
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean) / std


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The released training augmentation: random 32x32 crop of the zero-padded image, random h-flip."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def _fashion_to_cifar_layout(images_28: np.ndarray) -> torch.Tensor:
    images = torch.from_numpy(np.array(images_28, dtype=np.uint8)).view(-1, 1, 28, 28)
    return torch.nn.functional.pad(images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetUnavailable(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetUnavailable(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for folder in (directory, directory / "FashionMNIST" / "raw", directory / "fashion-mnist"):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _search_dirs(data_dir: str | os.PathLike | None, extra: tuple[Path, ...] = ()) -> list[Path]:
    dirs = [Path(data_dir)] if data_dir else []
    return dirs + [Path("data")] + list(extra)


def _load_fashion_mnist(split: str, data_dir) -> ImageSet | None:
    prefix = "train" if split == "train" else "t10k"
    for directory in _search_dirs(data_dir, (FASHION_MNIST_SYSTEM_DIR,)):
        images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
        if images_path and labels_path:
            images, labels = _read_idx(images_path), _read_idx(labels_path)
            return ImageSet(_fashion_to_cifar_layout(images), torch.from_numpy(labels.astype(np.int64)))
    return None


def load_bundled_fashion_mnist(split: str) -> ImageSet:
    """The copy shipped with the package: the full test set, or the first CALIBRATION_POOL train images."""
    with np.load(BUNDLED_FASHION_MNIST) as archive:
        images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
    return ImageSet(_fashion_to_cifar_layout(images), torch.from_numpy(labels.astype(np.int64)))


def _cifar_class(name: str):
    from torchvision import datasets
    return datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100


def _load_cifar(name: str, split: str, data_dir) -> ImageSet | None:
    cls = _cifar_class(name)
    for directory in _search_dirs(data_dir):
        try:
            dataset = cls(root=str(directory), train=split == "train", download=False)
        except RuntimeError:
            continue
        return _cifar_to_imageset(dataset)
    return None


def _cifar_to_imageset(dataset) -> ImageSet:
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(dataset.targets, dtype=torch.int64))


def _places(name: str, data_dir) -> str:
    extra = (FASHION_MNIST_SYSTEM_DIR,) if name == "fashion-mnist" else ()
    return ", ".join(str(d) for d in _search_dirs(data_dir, extra))


def _download_torchvision(name: str, split: str, data_dir) -> ImageSet:
    from torchvision import datasets
    root = Path(data_dir) if data_dir else Path("data")
    try:
        if name == "fashion-mnist":
            dataset = datasets.FashionMNIST(root=str(root), train=split == "train", download=True)
            return ImageSet(_fashion_to_cifar_layout(dataset.data.numpy()), dataset.targets.long())
        return _cifar_to_imageset(_cifar_class(name)(root=str(root), train=split == "train", download=True))
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError... when offline
        raise DatasetUnavailable(
            f"{name} ({split}) was not found in {_places(name, data_dir)} and could not be downloaded "
            f"({type(error).__name__}: {error}). Put the torchvision copy of {name} in one of those "
            f"folders (or pass --data-dir DIR) and run again.") from None


def load_split(name: str, split: str, data_dir=None, allow_bundled: bool = True, download: bool = True) -> ImageSet:
    """Load a split from --data-dir, ./data, the system copy, the bundled copy, or a download.

    The bundled Fashion-MNIST copy holds the test set and only the calibration pool of the training
    set; it is used for "train" only when the caller needs no more than that pool (allow_bundled).
    """
    info = dataset_info(name)
    check_choice(split, SPLITS, "split")
    found = _load_fashion_mnist(split, data_dir) if info.name == "fashion-mnist" else _load_cifar(info.name, split, data_dir)
    if found is not None:
        return found
    if info.name == "fashion-mnist" and allow_bundled and BUNDLED_FASHION_MNIST.is_file():
        return load_bundled_fashion_mnist(split)
    if not download:
        raise DatasetUnavailable(f"{info.name} ({split}) was not found in {_places(info.name, data_dir)} and "
                                 f"downloading is off; put the torchvision copy of {info.name} in one of those "
                                 "folders (or pass --data-dir DIR)")
    return _download_torchvision(info.name, split, data_dir)


def calibration_set(name: str, data_dir=None, download: bool = True) -> ImageSet:
    """The first CALIBRATION_POOL training images: the source of importance/statistics batches."""
    return load_split(name, "train", data_dir, allow_bundled=True, download=download).subset(CALIBRATION_POOL)


def calibration_batches(images: ImageSet, info: DatasetInfo, count: int, batch_size: int,
                        seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` shuffled, augmented (crop + flip, as the released train loader) normalised batches."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    batches = []
    for b in range(count):
        index = order[(torch.arange(batch_size) + b * batch_size) % len(images)]
        batch = random_crop_flip(images.images[index], generator)
        batches.append((normalize(batch, info), images.labels[index]))
    return batches
