"""Atomic file writes: a reader never sees a half-written result, checkpoint or table."""
from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename. The file
    keeps the mode it had; a new one gets the usual mode for new files (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive lock (flock on `path`.lock beside it) held for the block: writers of one file
    in several processes take turns, so a read-merge-write never loses another's rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, a destination that is a directory or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name")
    _check_can_create_in(path.parent, path, what)
    return path


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, a destination folder that is a file or cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a directory")
    _check_can_create_in(path, path, what)
    return path


def _check_can_create_in(folder: Path, path: Path, what: str) -> None:
    """Create (and remove) a file in `folder`, or in its nearest existing ancestor: the only test that
    also holds for root and for file systems such as /proc."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise ValueError(f"{what} {path}: cannot write in {folder}") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    import torch
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)
