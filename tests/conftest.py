import sys
from pathlib import Path

import numpy as np

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import randomize_batchnorms, write_idx  # noqa: E402
from torch_pruning_ext.experiments.models import build_model  # noqa: E402


@pytest.fixture
def make_model():
    def make(name: str, num_classes: int = 10, seed: int = 0):
        torch.manual_seed(seed)
        return randomize_batchnorms(build_model(name, num_classes), seed)
    return make


@pytest.fixture
def example():
    return torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 96-image Fashion-MNIST-format data set (IDX files), test and train."""
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, count in (("t10k", 96), ("train", 256)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, classes, dataset in (("vgg11_bn", 10, "fashion-mnist"), ("resnet18", 10, "fashion-mnist"),
                                   ("vgg11_bn", 100, "cifar100")):
        torch.manual_seed(0)
        model = build_model(name, classes)
        path = folder / f"{name}_{classes}.checkpoint"
        torch.save({"model_state_dict": model.state_dict(), "test_accuracy": 0.1, "epoch": 1,
                    "metadata": {"model": name, "dataset": dataset, "num_classes": classes}}, path)
        paths[(name, classes)] = path
    released = folder / "released.checkpoint"  # the released format carries no metadata
    torch.save({"model_state_dict": build_model("vgg11_bn", 10).state_dict(), "test_accuracy": 0.9, "epoch": 300},
               released)
    paths["released"] = released
    return paths


@pytest.fixture
def run_main(capsys):
    """Run main.py with these arguments: (exit code, stdout, stderr)."""
    import main

    def run(*argv):
        try:
            code = main.main([str(a) for a in argv])
        except SystemExit as stop:  # argparse rejects bad arguments this way
            code = stop.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run
