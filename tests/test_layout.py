"""The library core stands alone: it imports only torch, torch-pruning, POT, numpy and scipy (plus
the standard library), never the experiment harness, and a tiny model folds, prunes with fusion and
saves with nothing else installed. CI also runs this file in a venv holding only those packages."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

PACKAGE = Path(__file__).resolve().parent.parent / "torch_pruning_ext"
CORE_THIRD_PARTY = {"torch", "torch_pruning", "ot", "numpy", "scipy"}
LAZY_OPTIONAL = {"sklearn", "onnx", "onnxruntime"}  # imported inside the functions that need them


def _imports(path: Path):
    """(module name, level, at top level?) for every import statement in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level, id(node) in top


def test_core_modules_import_nothing_from_the_harness_or_its_dependencies():
    core = sorted(PACKAGE.glob("*.py"))
    assert len(core) > 10
    stdlib = set(sys.stdlib_module_names)
    for path in core:
        for module, level, at_top in _imports(path):
            root = module.split(".")[0]
            where = f"{path.name} imports {'.' * level}{module}"
            assert not (level and root == "experiments"), where
            assert not (level == 0 and module.startswith("torch_pruning_ext.experiments")), where
            if level == 0 and root not in stdlib and root not in CORE_THIRD_PARTY:
                assert root in LAZY_OPTIONAL and not at_top, where


@pytest.mark.slow
def test_importing_the_library_loads_no_harness_module():
    # torch-pruning may load some of these itself; what matters is what importing this library adds
    code = ("import sys, torch, torch_pruning, ot, numpy, scipy; before = set(sys.modules); import torch_pruning_ext; "
            "bad = [m for m in set(sys.modules) - before if m.split('.')[0] in "
            "('torchvision', 'pandas', 'tqdm', 'matplotlib', 'sklearn', 'onnx') "
            "or m.startswith('torch_pruning_ext.experiments')]; print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class _Tiny(nn.Module):
    """Conv-BN-ReLU twice, then a linear head: one prunable group per conv."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x))


def test_fold_prune_with_fusion_save_and_load_with_only_the_core(tmp_path):
    from torch_pruning_ext import IntraFusionPruner, OptimalTransport, fold_batchnorms, load_pruned, save_pruned
    torch.manual_seed(0)
    model = _Tiny().eval()
    for bn in (model.features[1], model.features[4]):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorms(model, x[:1])
        assert sorted((pair.layer, pair.batchnorm) for pair in folded) == [("features.0", "features.1"), ("features.3", "features.4")]
        assert torch.allclose(model(x), before, atol=1e-5)
        results = IntraFusionPruner(model, x[:1], importance="l1").prune(
            "all", 0.5, transport=OptimalTransport(), fusion_rule="function_preserving")
    assert [result.fused for result in results] == [True, True]
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [4, 4]
    save_pruned(model, tmp_path / "tiny.pt")
    loaded = load_pruned(tmp_path / "tiny.pt", builder=_Tiny)
    assert torch.equal(loaded(x), model(x))
