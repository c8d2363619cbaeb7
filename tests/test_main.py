import json
import zipfile

import pytest
import torch

from torch_pruning_ext.experiments.checkpoints import CheckpointError, load_model, resolve_checkpoint
from torch_pruning_ext.experiments.data import dataset_info, load_bundled_fashion_mnist, load_split, normalize
from torch_pruning_ext.experiments.models import build_model
from torch_pruning_ext.experiments.results import read_rows
from torch_pruning_ext.experiments.protocol import Protocol, Settings


@pytest.mark.slow
def test_cli_end_to_end_writes_csv_and_json(tiny_data, checkpoints, run_main, tmp_path):
    common = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--group_idxs", 1, 7,
              "--sparsities", 0.3, 0.7, "--methods", "default", "intra_fusion", "intra_fusion_fp"]
    code, out, _ = run_main(*common, "--output", tmp_path / "rows.csv")
    assert code == 0
    assert "group" in out and "s=0.3" in out and "s=0.7" in out
    rows = read_rows(tmp_path / "rows.csv")
    assert len(rows) == 1 + 2 * 2 * 3
    assert list(rows[0])[:10] == ["model", "dataset", "criterion", "group", "sparsity", "method", "accuracy",
                                  "params", "macs", "prune_seconds"]
    base = [r for r in rows if r["method"] == "base"][0]
    assert int(base["params"]) == 9_231_114
    pruned = [r for r in rows if r["group"] == "1" and r["sparsity"] == "0.7"]
    assert {r["params"] for r in pruned} == {"5921493"}
    # accuracy is per sample: a multiple of 1/96
    for row in rows:
        assert abs(float(row["accuracy"]) / 100 * 96 - round(float(row["accuracy"]) / 100 * 96)) < 1e-3
    # the same command writes the same numbers; json output is chosen by suffix
    code, _, _ = run_main(*common, "--output", tmp_path / "rows.json")
    again = json.loads((tmp_path / "rows.json").read_text())
    assert code == 0 and [r["accuracy"] for r in again] == [float(r["accuracy"]) for r in rows]


@pytest.mark.slow
def test_output_merges_with_rows_already_there(tiny_data, checkpoints, run_main, tmp_path):
    out = tmp_path / "rows.csv"
    args = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--sparsities", 0.5,
            "--methods", "default", "--output", out]
    assert run_main(*args, "--group_idxs", 1)[0] == 0
    assert run_main(*args, "--group_idxs", 2)[0] == 0
    assert run_main(*args, "--group_idxs", 2)[0] == 0
    rows = read_rows(out)
    assert sorted((r["group"], r["method"]) for r in rows) == [("", "base"), ("1", "default"), ("2", "default")]


@pytest.mark.slow
def test_taylor_and_chip_are_deterministic(tiny_data, checkpoints, run_main, tmp_path):
    args = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--group_idxs", 0,
            "--sparsities", 0.5, "--importance_criteria", "taylor", "chip", "random", "taylor_fm", "thinet",
            "--taylor-batches", 1]
    assert run_main(*args, "--output", tmp_path / "a.csv")[0] == 0
    assert run_main(*args, "--output", tmp_path / "b.csv")[0] == 0
    assert (tmp_path / "a.csv").read_text().count("taylor") >= 3
    strip = lambda rows: [{k: v for k, v in r.items() if k != "prune_seconds"} for r in rows]  # noqa: E731
    assert strip(read_rows(tmp_path / "a.csv")) == strip(read_rows(tmp_path / "b.csv"))


def test_list_groups(checkpoints, run_main):
    code, out, _ = run_main("--checkpoint", checkpoints[("resnet18", 10)], "--model-name", "resnet18",
                            "--list-groups")
    assert code == 0 and len(out.strip().splitlines()) == 12 and out.startswith("[0] layer4.1.conv2")


@pytest.mark.parametrize("argv, message", [
    (["--sparsities", "1.0"], r"sparsity must be a number in \[0, 1\), got '1.0'"),
    (["--sparsities", "-0.2"], r"sparsity must be a number in \[0, 1\)"),
    (["--group_idxs", "8"], r"group index 8 is not in vgg11_bn: valid indices are 0\.\.7"),
    (["--importance_criteria", "l5"], r"unknown criterion 'l5'"),
    (["--methods", "magic"], r"unknown method 'magic'"),
    (["--model-name", "vgg16"], r"unknown model 'vgg16'"),
    (["--dataset", "mnist"], r"unknown dataset 'mnist'"),
    (["--output", "rows.txt"], r"must end in \.csv or \.json"),
])
def test_bad_arguments_exit_2_with_one_line(checkpoints, tiny_data, run_main, argv, message):
    code, _, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err), err


def test_bad_checkpoints(checkpoints, tiny_data, run_main, tmp_path):
    corrupt = tmp_path / "corrupt.checkpoint"
    corrupt.write_bytes(b"not a checkpoint")
    cases = [
        (["--checkpoint", tmp_path / "missing.checkpoint"], "missing.checkpoint does not exist"),
        (["--checkpoint", corrupt], "corrupt or not a PyTorch file"),
        (["--checkpoint", checkpoints[("resnet18", 10)]], "holds a resnet18, not a vgg11_bn"),
        (["--checkpoint", checkpoints[("vgg11_bn", 100)]], "trained on cifar100, not fashion-mnist"),
    ]
    for argv, message in cases:
        code, _, err = run_main("--data-dir", tiny_data, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_released_checkpoint_without_metadata(checkpoints):
    loaded = load_model(checkpoints["released"], "vgg11_bn", "cifar10", 10)
    assert loaded.test_accuracy == 0.9 and loaded.metadata == {}
    with pytest.raises(CheckpointError, match="does not fit resnet18"):
        load_model(checkpoints["released"], "resnet18", "cifar10", 10)
    with pytest.raises(CheckpointError, match="has 10 classes but cifar100 has 100"):
        load_model(checkpoints["released"], "vgg11_bn", "cifar100", 100)


def test_checkpoint_lookup_order(checkpoints, tmp_path):
    data = checkpoints[("vgg11_bn", 10)].read_bytes()
    with zipfile.ZipFile(tmp_path / "models.zip", "w") as bundle:
        bundle.writestr("models/fashion-mnist/vgg11_bn.checkpoint", data)
        bundle.writestr("models/vgg11_bn.checkpoint", data)  # released CIFAR-10 layout
    extracted = resolve_checkpoint("vgg11_bn", "fashion-mnist", None, tmp_path)
    assert extracted == tmp_path / "models/fashion-mnist/vgg11_bn.checkpoint" and extracted.read_bytes() == data
    assert not list(tmp_path.rglob("*.tmp"))
    assert resolve_checkpoint("vgg11_bn", "cifar10", None, tmp_path) == tmp_path / "models/vgg11_bn.checkpoint"
    explicit = tmp_path / "mine.checkpoint"
    explicit.write_bytes(data)
    assert resolve_checkpoint("vgg11_bn", "fashion-mnist", str(explicit), tmp_path) == explicit
    member = resolve_checkpoint("vgg11_bn", "cifar10", f"{tmp_path / 'models.zip'}:models/vgg11_bn.checkpoint", tmp_path)
    assert member.read_bytes() == data
    with pytest.raises(CheckpointError, match="no checkpoint for resnet18 on fashion-mnist"):
        resolve_checkpoint("resnet18", "fashion-mnist", None, tmp_path)


def test_missing_dataset_gives_a_clear_message(checkpoints, run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 100)], "--dataset", "cifar100",
                            "--data-dir", tmp_path / "nowhere", "--no-download")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cifar100 (test) was not found in" in err and "--data-dir" in err


def test_bundled_fashion_mnist_layout_and_normalisation():
    test = load_bundled_fashion_mnist("test")
    train = load_bundled_fashion_mnist("train")
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert len(train) == 2048 and sorted(test.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert torch.all(test.images[:, :, :2] == 0) and torch.all(test.images[:, :, :, -2:] == 0)
    assert torch.equal(test.images[:, 0], test.images[:, 2])
    inputs = normalize(test.images[:10], dataset_info("fashion-mnist"))
    assert inputs[0, 0, 0, 0].item() == pytest.approx(-0.2860 / 0.3530)
    assert load_split("fashion-mnist", "test", "/nonexistent", download=False).labels.shape == (10000,)


@pytest.mark.slow
@pytest.mark.parametrize("name, groups, criterion", [("vgg11_bn", [0, 3, 7], "l1"), ("resnet18", [0, 5, 11], "l1"),
                                                     ("vgg11_bn", [0, 3, 7], "taylor")])
def test_prefix_reuse_gives_identical_numbers(tiny_data, name, groups, criterion):
    from tests.helpers import randomize_batchnorms
    torch.manual_seed(0)
    model = randomize_batchnorms(build_model(name, 10))
    test = load_split("fashion-mnist", "test", tiny_data)
    inputs = normalize(test.images, dataset_info("fashion-mnist"))
    rows = {}
    for reuse in (True, False):
        protocol = Protocol(model, Settings(name, "fashion-mnist", criterion), inputs, test.labels, batch_size=40,
                            reuse=reuse, calibration_batches=[(inputs[:8], test.labels[:8])])
        assert (protocol.cache is not None) == reuse and (protocol.score_cache is not None) == reuse
        rows[reuse] = [protocol.run_cell(g, s, m) for g in groups for s in (0.3, 0.5)
                       for m in ("default", "intra_fusion")]  # scores cached at 0.3 are reused at 0.5
        rows[reuse] += [protocol.run_cell(groups[:2], 0.3, "intra_fusion_fp")]
        if reuse:  # a second protocol (another repair mode) sharing both caches gives the same cells
            shared = Protocol(model, Settings(name, "fashion-mnist", criterion, repair="datafree"), inputs,
                              test.labels, batch_size=40, calibration_batches=[(inputs[:8], test.labels[:8])],
                              prefix_cache=protocol.cache, score_cache=protocol.score_cache)
            assert shared.score_cache is protocol.score_cache and shared.cache is protocol.cache
            pairs = [(shared.run_cell(g, 0.5, "default"), protocol.run_cell(g, 0.5, "default")) for g in groups]
            assert all(a["accuracy"] == b["accuracy"] for a, b in pairs)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "prune_seconds"} for r in rs]  # noqa: E731
    assert strip(rows[True]) == strip(rows[False])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_prefix_cache_moving_forward_equals_starting_over(make_model, name):
    from torch_pruning_ext.experiments.staged import PrefixCache, run_stages
    model = make_model(name)
    inputs = torch.randn(50, 3, 32, 32)
    cache = PrefixCache(model, inputs, batch_size=20)
    stages = len(model.stages())
    for start in (1, 2, stages // 2, stages - 1, 3):  # forward, forward, forward, then back
        assert torch.equal(cache.activations(start), run_stages(model, inputs, 0, start, 20)), start


@pytest.mark.slow
def test_run_cells_gives_the_rows_of_run_cell_in_the_order_asked(tiny_data, make_model):
    test = load_split("fashion-mnist", "test", tiny_data)
    inputs = normalize(test.images, dataset_info("fashion-mnist"))
    cells = [(0, 0.5, "default"), (7, 0.5, "intra_fusion"), (3, 0.3, "default"), (7, 0.3, "default")]
    protocol = Protocol(make_model("vgg11_bn"), Settings("vgg11_bn", "fashion-mnist", "l1"), inputs, test.labels)
    starts = []
    protocol.cache.activations = lambda start, seen=protocol.cache.activations: starts.append(start) or seen(start)
    rows = protocol.run_cells(cells)
    assert starts == sorted(starts) and len(set(starts)) == 3  # the cache only moved forward
    strip = lambda r: {k: v for k, v in r.items() if k != "prune_seconds"}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(protocol.run_cell(*cell)) for cell in cells]


@pytest.mark.slow
def test_fast_layout_keeps_outputs_and_restores_the_model(make_model):
    from torch_pruning_ext.experiments.evaluation import fast_layout, predictions
    model = make_model("resnet18")
    inputs = torch.randn(30, 3, 32, 32)
    with torch.no_grad():
        reference = model(inputs)
        with fast_layout(model):
            assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            fast = model(inputs.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(fast, reference, atol=1e-4)
    assert all(p.is_contiguous() for p in model.parameters())
    assert torch.equal(predictions(model, inputs, batch_size=7), reference.argmax(dim=1))
    model.register_buffer("template", torch.randn(2, 3, 4, 5))
    model.layer1[0].conv1.weight.grad = torch.ones_like(model.layer1[0].conv1.weight)
    predictions(model, inputs, batch_size=7)
    assert model.template.is_contiguous() and model.layer1[0].conv1.weight.grad.is_contiguous()
    model.train()
    model(inputs).sum().backward()  # still trainable: evaluation left no inference tensors behind
    model.to(memory_format=torch.channels_last)  # a user's own layout choice survives evaluation
    predictions(model, inputs, batch_size=7)
    assert model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.layer1[0].conv1.weight.is_contiguous()


@pytest.mark.slow
def test_save_pruned_from_the_cli(tiny_data, checkpoints, run_main, tmp_path):
    from torch_pruning_ext import load_pruned
    args = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--group_idxs", 2,
            "--sparsities", 0.5, "--methods", "intra_fusion", "--save-pruned", tmp_path / "pruned"]
    assert run_main(*args)[0] == 0
    saved = tmp_path / "pruned" / "vgg11_bn_fashion-mnist_l1_g2_s0.5_intra_fusion.pt"
    assert run_main(*args, "--repair", "datafree", "--p", 2)[0] == 0  # a variant gets its own file
    assert (tmp_path / "pruned" / "vgg11_bn_fashion-mnist_l1_g2_s0.5_intra_fusion_p-2_repair-datafree.pt").is_file()
    model = load_pruned(saved)
    assert model.features[18].out_channels == 256 and model.features[22].in_channels == 256


@pytest.mark.slow
def test_repair_modes_from_the_cli(tiny_data, checkpoints, run_main, tmp_path):
    args = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--group_idxs", 1,
            "--sparsities", 0.7, "--methods", "intra_fusion", "--output", tmp_path / "rows.csv",
            "--save-pruned", tmp_path / "pruned"]
    for mode in ("none", "data", "data_downstream", "datafree"):
        assert run_main(*args, "--repair", mode, "--repair-samples", 64)[0] == 0
    from torch_pruning_ext import fold_batchnorms, load_pruned
    from torch_pruning_ext.repair import layer_statistics
    stem = tmp_path / "pruned" / "vgg11_bn_fashion-mnist_l1_g1_s0.7_intra_fusion"
    suffix = {"none": "", "data": "_repair-data_repair-samples-64",
              "data_downstream": "_repair-data_downstream_repair-samples-64", "datafree": "_repair-datafree"}
    saved = {mode: load_pruned(f"{stem}{end}.pt") for mode, end in suffix.items()}
    original = load_model(checkpoints[("vgg11_bn", 10)], "vgg11_bn", "fashion-mnist", 10).model.eval()
    fold_batchnorms(original, torch.randn(1, 3, 32, 32), "reference")  # what the CLI pruned
    inputs = normalize(load_split("fashion-mnist", "test", tiny_data).images, dataset_info("fashion-mnist"))
    # group 1 = features.22 (producer) and features.25 (consumer, keeps its 512 outputs): the data repairs
    # bring the consumer's output statistics, shifted by fusion, back to the original's
    target = layer_statistics(original, ["features.25"], inputs)["features.25"]
    gaps = {}
    for mode, model in saved.items():
        stats = layer_statistics(model, ["features.25"], inputs)["features.25"]
        gaps[mode] = max((stats[i] - target[i]).abs().max().item() for i in (0, 1))
    assert gaps["data"] < 0.2 * gaps["none"] and gaps["data_downstream"] < 0.2 * gaps["none"]
    # the data-free repair rescales the fused producer and leaves the consumer alone
    layers = {mode: dict(model.named_modules()) for mode, model in saved.items()}
    assert not torch.allclose(layers["datafree"]["features.22"].weight, layers["none"]["features.22"].weight)
    assert torch.equal(layers["datafree"]["features.25"].weight, layers["none"]["features.25"].weight)
    rows = read_rows(tmp_path / "rows.csv")
    assert sorted({r["repair"] for r in rows}) == ["data", "data_downstream", "datafree", "none"]
    assert len([r for r in rows if r["method"] == "intra_fusion"]) == 4
    assert {r["repair"]: r["repair_samples"] for r in rows if r["method"] == "intra_fusion"} == \
        {"none": "", "data": "64", "data_downstream": "64", "datafree": ""}
    code, _, err = run_main(*args, "--repair", "data", "--repair-samples", 5000)
    assert code == 2 and "--repair-samples 5000 is more than the 256" in err


@pytest.mark.slow
def test_finetuning_after_pruning(tiny_data, checkpoints, run_main, tmp_path):
    args = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--group_idxs", 1,
            "--sparsities", 0.7, "--methods", "default", "--output", tmp_path / "rows.csv",
            "--save-pruned", tmp_path / "pruned"]
    assert run_main(*args, "--finetune-epochs", 0.25)[0] == 0
    assert run_main(*args)[0] == 0
    rows = [r for r in read_rows(tmp_path / "rows.csv") if r["method"] == "default"]
    assert sorted(r["finetune_epochs"] for r in rows) == ["0.0", "0.25"]
    assert {r["params"] for r in rows} == {"5921493"}  # fine-tuning keeps the pruned shape
    from torch_pruning_ext import load_pruned
    stem = tmp_path / "pruned" / "vgg11_bn_fashion-mnist_l1_g1_s0.7_default"
    plain, tuned = load_pruned(f"{stem}.pt"), load_pruned(f"{stem}_finetune-epochs-0.25.pt")
    # fine-tuning trains every layer, also those pruning never touches (the first conv, the classifier)
    for name in ("features.0", "classifier"):
        before, after = dict(plain.named_modules())[name].weight, dict(tuned.named_modules())[name].weight
        assert before.shape == after.shape and not torch.allclose(before, after), name


@pytest.mark.slow
def test_gate_criterion_needs_a_gated_checkpoint(tiny_data, checkpoints, run_main, tmp_path):
    args = ["--data-dir", tiny_data, "--group_idxs", 7, "--sparsities", 0.5, "--importance_criteria", "gate"]
    code, _, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 10)], *args)
    assert code == 2 and "needs a checkpoint trained with channel gates" in err
    state = torch.load(checkpoints[("vgg11_bn", 10)], weights_only=True)
    state["gates"] = {"features.0": torch.linspace(0, 1, 64)}
    torch.save(state, tmp_path / "gated.checkpoint")
    code, out, _ = run_main("--checkpoint", tmp_path / "gated.checkpoint", *args, "--output", tmp_path / "r.csv")
    assert code == 0 and {r["criterion"] for r in read_rows(tmp_path / "r.csv")} == {"gate"}


@pytest.mark.slow
def test_explicit_defaults_name_the_same_settings(tiny_data, checkpoints, run_main, tmp_path):
    args = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--group_idxs", 1,
            "--sparsities", 0.5, "--methods", "default", "--output", tmp_path / "rows.csv"]
    assert run_main(*args)[0] == 0
    assert run_main(*args, "--p", 1, "--finetune-epochs", 0, "--seed", 0)[0] == 0
    # data sizes that do not apply (no data criterion, no data repair) do not name new rows either
    assert run_main(*args, "--taylor-batches", 2, "--thinet-samples", 8, "--repair-samples", 4)[0] == 0
    assert len(read_rows(tmp_path / "rows.csv")) == 2


@pytest.mark.slow
def test_data_sizes_name_their_rows(tiny_data, checkpoints, run_main, tmp_path):
    args = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--group_idxs", 1,
            "--sparsities", 0.5, "--methods", "default", "--importance_criteria", "thinet", "l1",
            "--taylor-batches", 1, "--output", tmp_path / "rows.csv"]
    assert run_main(*args, "--thinet-samples", 8)[0] == 0
    assert run_main(*args, "--thinet-samples", 64)[0] == 0
    rows = read_rows(tmp_path / "rows.csv")
    thinet = {r["thinet_samples"] for r in rows if r["criterion"] == "thinet"}
    assert thinet == {"8", "64"} and {r["thinet_samples"] for r in rows if r["criterion"] == "l1"} == {""}
    assert {r["taylor_batches"] for r in rows} == {"1", ""}  # recorded for thinet only, not for l1
    assert len(rows) == 6  # thinet: base + cell at each sample count; l1: base + cell, once
    code, _, err = run_main(*args, "--thinet-samples", 0)
    assert code == 2 and "thinet-samples must be a positive integer, got 0" in err


@pytest.mark.slow
def test_a_default_run_traces_the_graph_once_per_cell_plus_one(tiny_data, checkpoints, run_main, monkeypatch):
    import torch_pruning as tp
    traces = []
    build = tp.DependencyGraph.build_dependency
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency",
                        lambda self, *a, **k: traces.append(1) or build(self, *a, **k))
    code, _, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data,
                            "--group_idxs", 1, 2, "--sparsities", 0.3, 0.7)
    assert code == 0, err
    assert len(traces) == 2 * 2 * 2 + 1  # groups x sparsities x (default, intra_fusion), plus the fold


@pytest.mark.slow
def test_synthetic_calibration_from_the_cli_reads_no_training_data(tiny_data, checkpoints, run_main, tmp_path,
                                                                   monkeypatch):
    import main

    def no_training_data(*args, **kwargs):
        raise AssertionError("training images were read")
    monkeypatch.setattr(main, "calibration_set", no_training_data)
    args = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--group_idxs", 1,
            "--sparsities", 0.5, "--methods", "default", "--repair", "reconstruct", "--output", tmp_path / "rows.csv"]
    with pytest.raises(AssertionError, match="training images were read"):
        run_main(*args, "--repair-samples", 8)  # real calibration reads them
    code, _, err = run_main(*args, "--repair-samples", 8, "--calibration", "synthetic")
    assert code == 0, err
    assert "synthesised 8 calibration images" in err
    rows = [r for r in read_rows(tmp_path / "rows.csv") if r["method"] == "default"]
    assert [(r["calibration"], r["repair_samples"], r["repair"]) for r in rows] == [("synthetic", "8", "reconstruct")]


@pytest.mark.parametrize("extra, message", [
    (["--repair", "none"], "--calibration synthetic feeds a data repair, but --repair is none"),
    (["--repair", "reconstruct", "--importance_criteria", "taylor"],
     "criterion taylor is measured on labelled training batches"),
    (["--repair", "reconstruct", "--calibration", "synthetc"], "unknown calibration 'synthetc'"),
    (["--repair", "datafree", "--calibration", "data", "--repair-batch-size", "64"],
     "--repair-batch-size 64 applies to --repair reconstruct only, not datafree"),
    (["--repair", "reconstruct", "--repair-batch-size", "0"], "must be a positive integer, got '0'"),
])
def test_synthetic_calibration_is_checked_before_any_work(checkpoints, run_main, extra, message):
    argv = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--calibration", "synthetic"] + extra
    code, out, err = run_main(*argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == ""


def test_synthetic_images_are_cached_per_model_count_and_seed(tmp_path, monkeypatch):
    from torch_pruning_ext.experiments import protocol

    def small(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model, cache = small(0), tmp_path / "synthetic.pt"
    example = torch.zeros(1, 3, 8, 8)
    made, report = protocol.synthetic_images(model, example, 4, seed=1, cache=cache)
    assert made.shape == (4, 3, 8, 8) and report["samples"] == 4 and cache.is_file()

    def never(*args, **kwargs):
        raise AssertionError("synthesised again")
    monkeypatch.setattr(protocol, "synthesize_calibration", never)
    again, _ = protocol.synthetic_images(model, example, 4, seed=1, cache=cache)
    assert torch.equal(again, made)
    for other in ((small(1), 4, 1), (model, 4, 2), (model, 5, 1)):  # model, count, seed
        with pytest.raises(AssertionError, match="synthesised again"):
            protocol.synthetic_images(other[0], example, other[1], seed=other[2], cache=cache)


@pytest.mark.slow
def test_repair_batch_size_from_the_cli_names_its_rows(tiny_data, checkpoints, run_main, tmp_path):
    args = ["--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--group_idxs", "all",
            "--sparsities", 0.5, "--methods", "default", "--repair", "reconstruct", "--repair-samples", 96,
            "--output", tmp_path / "rows.csv"]
    assert run_main(*args)[0] == 0 and run_main(*args, "--repair-batch-size", 32)[0] == 0
    rows = {r["repair_batch_size"]: r for r in read_rows(tmp_path / "rows.csv") if r["method"] == "default"}
    assert sorted(rows) == ["", "32"]  # one row each: another chunk size is its own setting
    # chunks of 32 refit from the same 96 images: the accuracy is that of one chunk, near enough
    assert abs(float(rows["32"]["accuracy"]) - float(rows[""]["accuracy"])) <= 5


@pytest.mark.slow
@pytest.mark.parametrize("method, repair", [("default", "none"), ("fold", "datafree"), ("intra_fusion_fp", "reconstruct"),
                                            ("fold", "data_downstream"), ("fold", "variance")])
def test_compress_and_the_protocol_give_the_same_model_bit_for_bit(make_model, method, repair):
    """One pipeline: the library call and main.py's protocol fold, prune, fuse and repair alike."""
    from torch_pruning_ext import compress
    model = make_model("vgg11_bn")
    inputs, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    calibration = inputs[:32] if repair in ("reconstruct", "data_downstream") else None
    protocol = Protocol(model, Settings("vgg11_bn", "fashion-mnist", repair=repair), inputs, labels,
                        repair_inputs=calibration, batch_size=40)
    by_protocol, _, _ = protocol.prune_copy(protocol.prepared.expand("all"), 0.5, method)
    by_compress, _ = compress(model, inputs[:1], 0.5, method, calibration, repair=repair, fold_bn="reference")
    ours, theirs = by_protocol.state_dict(), by_compress.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
