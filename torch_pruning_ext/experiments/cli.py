"""Shared command-line plumbing: argument types and one-line errors with exit code 2."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

import torch
from tqdm import tqdm

from .checkpoints import CheckpointError
from .data import DatasetUnavailable
from .protocol import synthetic_images
from ..checks import check_choice
from ..pruner import check_sparsity

USER_ERRORS = (ValueError, CheckpointError, DatasetUnavailable)


class OneLineParser(argparse.ArgumentParser):
    """Bad input ends with one line naming the problem and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def choice(allowed, what):
    """An argparse type accepting only `allowed`, with a message that lists them."""
    def check(value):
        try:
            return check_choice(value, allowed, what)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return check


def sparsity(value):
    try:
        return check_sparsity(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {value!r}") from None


def positive_int(value):
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def device(name):
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:1, ...)."""
    try:
        found = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {name!r}") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {name} requested but CUDA is not available; use --device cpu")
    if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {name} requested but this machine has "
                                         f"{torch.cuda.device_count()} CUDA devices")
    return found


def run_cli(prog: str, function, args) -> int:
    """Run `function(args)`; a user error becomes one line on stderr and exit code 2."""
    try:
        return function(args)
    except USER_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


@contextmanager
def progress_bar(description: str):
    """A tqdm bar and the library's progress(done, total) callback that drives it."""
    with tqdm(desc=description, unit="step") as bar:
        def advance(done, total):
            bar.total = total
            bar.update(done - bar.n)
        yield advance


def synthesise_with_progress(model, example, count: int, seed: int, cache=None) -> torch.Tensor:
    """Calibration images from the model's BatchNorm statistics, with a progress bar and a report line."""
    with progress_bar("synthesising calibration") as advance:
        inputs, report = synthetic_images(model, example, count, seed, cache, progress=advance)
    print(f"synthesised {report['samples']} calibration images in {report['seconds']:.0f} s "
          f"({report['iterations']} steps per batch; BatchNorm statistics mismatch {report['loss_start']:.3g} -> "
          f"{report['loss_end']:.3g})" + (", cut short by the time bound" if report["stopped_early"] else ""),
          file=sys.stderr)
    return inputs
