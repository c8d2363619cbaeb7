"""Finding, reading and validating checkpoints in the released format.

A checkpoint is ``torch.save({"model_state_dict", "test_accuracy", "epoch"})``; this project adds a
"metadata" entry (model, dataset, num_classes, normalisation, recipe). The released CIFAR-10 files
carry no metadata and are trusted to be of the data set the user names.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..files import atomic_path
from .models import build_model


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the requested model/data set."""


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    source: str
    test_accuracy: float | None
    metadata: dict
    gates: dict  # learned channel gates (layer name -> values) of a gated checkpoint, else empty


def zip_members(model_name: str, dataset: str) -> list[str]:
    members = [f"models/{dataset}/{model_name}.checkpoint"]
    if dataset == "cifar10":  # the released models.zip layout
        members.append(f"models/{model_name}.checkpoint")
    return members


def _extract(archive: Path, member: str, destination: Path) -> Path:
    """Extract one member to `destination` atomically (no partial file if interrupted)."""
    try:
        with zipfile.ZipFile(archive) as bundle, atomic_path(destination) as temporary:
            with bundle.open(member) as source, open(temporary, "wb") as target:
                while chunk := source.read(1 << 20):
                    target.write(chunk)
    except (zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"{archive} member {member} is corrupt ({error})") from None
    except OSError as error:
        raise CheckpointError(f"cannot extract {member} from {archive}: {error.strerror or error}") from None
    return destination


def _from_zip(archive: Path, wanted: list[str], root: Path) -> Path | None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            names = set(bundle.namelist())
    except zipfile.BadZipFile:
        raise CheckpointError(f"{archive} is not a valid zip file") from None
    for member in wanted:
        if member in names:
            destination = root / member
            return destination if destination.is_file() else _extract(archive, member, destination)
    return None


def resolve_checkpoint(model_name: str, dataset: str, explicit: str | None = None,
                       root: str | Path = ".") -> Path:
    """--checkpoint (a file, ARCHIVE.zip, or ARCHIVE.zip:MEMBER), else models/<dataset>/<model>.checkpoint
    (for cifar10 also models/<model>.checkpoint), else the matching member of models.zip, extracted once."""
    root = Path(root)
    wanted = zip_members(model_name, dataset)
    if explicit:
        archive, _, member = explicit.partition(".zip:")
        if member:
            archive_path = Path(archive + ".zip")
            if not archive_path.is_file():
                raise CheckpointError(f"checkpoint archive {archive_path} does not exist")
            found = _from_zip(archive_path, [member], archive_path.parent)
            if found is None:
                raise CheckpointError(f"{archive_path} has no member {member}")
            return found
        path = Path(explicit)
        if path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a directory; pass a checkpoint file or a .zip")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path.suffix.lower() == ".zip":
            found = _from_zip(path, wanted, path.parent)
            if found is None:
                raise CheckpointError(f"{path} has none of: {', '.join(wanted)}")
            return found
        return path
    for member in wanted:
        if (root / member).is_file():
            return root / member
    archive = root / "models.zip"
    if archive.is_file():
        found = _from_zip(archive, wanted, root)
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint for {model_name} on {dataset}: looked for "
                          f"{', '.join(str(root / m) for m in wanted)} and in {archive}; pass --checkpoint FILE")


def read_checkpoint(path: str | Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and EOF errors all mean the same thing to the user
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({type(error).__name__})") from None
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise CheckpointError(f"checkpoint {path} has no 'model_state_dict' entry")
    weights = state["model_state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"checkpoint {path}: 'model_state_dict' must map names to tensors, "
                              f"got {type(weights).__name__}")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {path}: tensor {name} contains NaN or inf values")
    if not isinstance(state.get("metadata") or {}, dict):
        raise CheckpointError(f"checkpoint {path}: 'metadata' must be a dict, got {type(state['metadata']).__name__}")
    accuracy = state.get("test_accuracy")
    if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))):
        raise CheckpointError(f"checkpoint {path}: 'test_accuracy' must be a number, got {accuracy!r}")
    return state


def _class_count(state_dict: dict) -> int | None:
    for key in ("classifier.weight", "linear.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def load_model(path: str | Path, model_name: str, dataset: str, num_classes: int) -> LoadedCheckpoint:
    """Build `model_name` and load the checkpoint; refuse a checkpoint of another model/data set."""
    state = read_checkpoint(path)
    metadata = state.get("metadata") or {}
    if metadata.get("dataset") not in (None, dataset):
        raise CheckpointError(f"checkpoint {path} was trained on {metadata['dataset']}, not {dataset}; "
                              f"pass --dataset {metadata['dataset']} or another checkpoint")
    if metadata.get("model") not in (None, model_name):
        raise CheckpointError(f"checkpoint {path} holds a {metadata['model']}, not a {model_name}")
    classes = _class_count(state["model_state_dict"])
    if classes is not None and classes != num_classes:
        raise CheckpointError(f"checkpoint {path} has {classes} classes but {dataset} has {num_classes}")
    model = build_model(model_name, num_classes)
    try:
        model.load_state_dict(state["model_state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"checkpoint {path} does not fit {model_name}: {detail}") from None
    accuracy = state.get("test_accuracy")
    return LoadedCheckpoint(model.eval(), str(path), None if accuracy is None else float(accuracy), metadata,
                            dict(state.get("gates") or {}))
