import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train_sparse  # noqa: E402
from torch_pruning_ext.experiments.checkpoints import load_model  # noqa: E402
from torch_pruning_ext.experiments.results import read_rows  # noqa: E402


def run(method, tiny_data, checkpoints, out, *extra):
    return train_sparse.main([method, "--checkpoint", str(checkpoints[("vgg11_bn", 10)]), "--data-dir", str(tiny_data),
                              "--out-dir", str(out), "--epochs", "0.5", *extra])


@pytest.mark.slow
def test_gate_lambda_sweep_writes_checkpoints_histograms_and_summary(tiny_data, checkpoints, tmp_path):
    # half an epoch is one Adam step of the gate scores: a large gate lr lets it close gates
    assert run("gates", tiny_data, checkpoints, tmp_path, "--lambdas", "1e-5", "1", "--gate-lr", "100") == 0
    rows = read_rows(tmp_path / "summary.csv")
    assert [r["setting"] for r in rows] == ["lambda=1e-05", "lambda=1"]
    sparsity = []
    for row, lam in zip(rows, ("1e-05", "1")):
        gates = torch.load(tmp_path / f"vgg11_bn_gates_channel_{lam}.checkpoint", weights_only=True)["gates"]
        closed = torch.cat([g.flatten() for g in gates.values()]) < train_sparse.CLOSED
        assert float(row["gate_sparsity"]) == pytest.approx(closed.float().mean().item(), abs=1e-6)
        sparsity.append(float(row["gate_sparsity"]))
    assert 0 < sparsity[0] < sparsity[1]  # the penalty closes more gates the larger lambda is
    assert (tmp_path / "gates_channel_1e-05.png").read_bytes()[:4] == b"\x89PNG"
    saved = torch.load(tmp_path / "vgg11_bn_gates_channel_1.checkpoint", weights_only=True)
    assert saved["gates"]["features.0"].shape == (64,) and "classifier" not in saved["gates"]
    loaded = load_model(tmp_path / "vgg11_bn_gates_channel_1.checkpoint", "vgg11_bn", "fashion-mnist", 10)
    assert loaded.gates and abs(float(rows[1]["accuracy"]) - 100 * saved["test_accuracy"]) < 1e-6


@pytest.mark.slow
def test_asl_and_magnitude_runs(tiny_data, checkpoints, tmp_path):
    assert run("asl", tiny_data, checkpoints, tmp_path, "--starget", "0.5", "--lv", "10") == 0
    assert run("magnitude", tiny_data, checkpoints, tmp_path, "--sparsities", "0.5", "0.9",
               "--retrain-epochs", "0.5") == 0
    rows = read_rows(tmp_path / "summary.csv")
    methods = [r["method"] for r in rows]
    assert methods.count("global magnitude") == 2 and methods.count("global magnitude + retraining") == 2
    asl = [r for r in rows if r["method"].startswith("adaptive")][0]
    assert float(asl["weight_sparsity"]) > 0
    magnitude = {r["setting"]: r for r in rows if r["method"] == "global magnitude"}
    assert abs(float(magnitude["s=0.9"]["weight_sparsity"]) - 0.9) < 1e-3
    assert int(magnitude["s=0.9"]["sparse_bytes"]) < int(magnitude["s=0.9"]["dense_bytes"])
    layers = (tmp_path / "asl_adaptive_0.5_layers.csv").read_text().splitlines()[1:]
    assert len(layers) == 9 and max(float(line.split(",")[1]) for line in layers) < 1  # no dead layer
