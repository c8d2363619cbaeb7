"""Bad destinations, checkpoints and results files are refused before any work, in one line."""
import multiprocessing
import os
import random
import stat
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from torch_pruning_ext.experiments.checkpoints import CheckpointError, read_checkpoint, resolve_checkpoint
from torch_pruning_ext.files import atomic_write_text
from torch_pruning_ext.experiments.models import build_model
from torch_pruning_ext.experiments.results import read_rows, write_rows
from torch_pruning_ext.serialization import save_pruned


@pytest.mark.parametrize("make_output,message", [
    (lambda tmp: "/proc/out.csv", "output file /proc/out.csv: cannot write in /proc"),
    (lambda tmp: _folder(tmp / "out.csv"), "out.csv is a directory; give a file name"),
    (lambda tmp: _write(tmp / "dict.json", '{"a": 1}'), "must hold a JSON list of rows"),
    (lambda tmp: _write(tmp / "bad.json", "{not json"), "bad.json is not valid JSON"),
    (lambda tmp: _write(tmp / "foreign.csv", "name,score\na,1\n"), "foreign.csv is not a results file of this project"),
    (lambda tmp: _write(tmp / "garbage.csv", "model,accuracy\nvgg,1,2,3\n"), "garbage.csv is corrupt"),
    (lambda tmp: _write(tmp / "nul.csv", "model,accuracy\nvgg\0,1\n"), "nul.csv is corrupt (NUL bytes)"),
])
def test_bad_output_is_refused_before_any_work(checkpoints, tiny_data, run_main, tmp_path, make_output, message):
    target = make_output(tmp_path)
    before = _snapshot(target)
    code, out, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data,
                           "--output", target)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "test images" not in err and out == ""  # no model was evaluated
    assert _snapshot(target) == before  # never merged into


def _write(path, text):
    path.write_text(text)
    return path


def _folder(path):
    path.mkdir()
    return path


def _snapshot(path):
    path = str(path)
    return open(path, "rb").read() if os.path.isfile(path) else None


def test_bad_save_pruned_is_refused_before_any_work(checkpoints, tiny_data, run_main, tmp_path):
    (tmp_path / "file").write_text("x")
    for folder, message in (("/proc/pr", "--save-pruned /proc/pr: cannot write in /proc"),
                            (tmp_path / "file", "is a file, not a directory")):
        code, out, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data,
                               "--save-pruned", folder)
        assert code == 2 and message in err and "test images" not in err, err


def test_save_pruned_in_the_library_names_the_bad_path(tmp_path):
    with pytest.raises(ValueError, match="pruned model file /proc/x.pt: cannot write in /proc"):
        save_pruned(build_model("vgg11_bn", 10), "/proc/x.pt", "vgg11_bn", 10)


def _checkpoint(tmp_path, name, **changes):
    state = {"model_state_dict": build_model("vgg11_bn", 10).state_dict(), "test_accuracy": 0.9,
             "metadata": {"model": "vgg11_bn", "dataset": "fashion-mnist", "num_classes": 10}} | changes
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_checkpoints_with_nan_or_wrong_types_are_refused(tmp_path):
    weights = build_model("vgg11_bn", 10).state_dict()
    weights["features.11.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="tensor features.11.weight contains NaN or inf values"):
        read_checkpoint(_checkpoint(tmp_path, "nan.ckpt", model_state_dict=weights))
    with pytest.raises(CheckpointError, match="'metadata' must be a dict, got str"):
        read_checkpoint(_checkpoint(tmp_path, "meta.ckpt", metadata="vgg"))
    with pytest.raises(CheckpointError, match="'model_state_dict' must map names to tensors, got list"):
        read_checkpoint(_checkpoint(tmp_path, "list.ckpt", model_state_dict=[1, 2]))
    with pytest.raises(CheckpointError, match="'test_accuracy' must be a number, got 'high'"):
        read_checkpoint(_checkpoint(tmp_path, "acc.ckpt", test_accuracy="high"))


def test_corrupt_zip_member_and_directory_checkpoints_are_reported(tmp_path):
    source = _checkpoint(tmp_path, "good.ckpt")
    archive = tmp_path / "models.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
        bundle.write(source, "models/fashion-mnist/vgg11_bn.checkpoint")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte inside the stored member: its CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="member models/fashion-mnist/vgg11_bn.checkpoint is corrupt"):
        resolve_checkpoint("vgg11_bn", "fashion-mnist", str(archive), tmp_path)
    with pytest.raises(CheckpointError, match="is a directory; pass a checkpoint file or a .zip"):
        resolve_checkpoint("vgg11_bn", "fashion-mnist", str(tmp_path), tmp_path)


def _writer(path, start):
    for i in range(start, start + 40):
        write_rows(path, [{"model": "m", "group": i, "accuracy": i}])


def test_concurrent_writers_keep_every_row(tmp_path):
    path = tmp_path / "rows.csv"
    workers = [multiprocessing.get_context("fork").Process(target=_writer, args=(path, start)) for start in (0, 1000)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(int(r["group"]) for r in read_rows(path)) == list(range(40)) + list(range(1000, 1040))


def test_atomic_rewrite_keeps_the_mode_and_new_files_follow_the_umask(tmp_path):
    path = tmp_path / "table.md"
    old = os.umask(0o022)
    try:
        atomic_write_text(path, "a")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)
        atomic_write_text(path, "b")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "b"
    finally:
        os.umask(old)


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import report  # noqa: E402
import sweep  # noqa: E402


def _one_line_exit_2(function, argv, capsys):
    """Run a CLI's main(argv): (exit code, stderr), the code 2 also when argparse exits."""
    try:
        code = function([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--device", "cuda"], "device cuda requested but CUDA is not available"),
    (["--run-dir", "/proc/x"], "--run-dir /proc/x: cannot write in /proc"),
    (["--run-dir", "{tmp}/file"], "file is a file, not a directory"),
    (["--run-dir", "{tmp}/bad"], "results.csv is corrupt (NUL bytes)"),
    (["--checkpoint", "{tmp}/file"], "must look like MODEL=FILE"),
    (["--checkpoint", "vgg=x"], "unknown model 'vgg'; choose one of:"),
    (["--checkpoint", "vgg11_bn={tmp}"], "is a directory; pass a checkpoint file or a .zip"),
    (["--checkpoint", "resnet18={tmp}/file"], "--checkpoint resnet18=...: resnet18 is not in --models"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer, got '0'"),
    (["--groups", "first"], "group 'first' is not an index, 'all-single' or 'whole'"),
    (["--save-pruned", "{tmp}/file"], "is a file, not a directory"),
])
def test_bad_sweep_options_fail_in_one_line_before_any_work(checkpoints, tiny_data, tmp_path, capsys, monkeypatch,
                                                            extra, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.csv").write_text("model\0\n")

    def forbidden(*args, **kwargs):
        raise AssertionError("data or a model was loaded before the options were checked")
    for name in ("load_split", "calibration_set", "load_model"):
        monkeypatch.setattr(sweep, name, forbidden)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--run-dir", tmp_path / "run", "--models", "vgg11_bn", "--data-dir", tiny_data, "--no-download",
            "--checkpoint", f"vgg11_bn={checkpoints[('vgg11_bn', 10)]}"]
    code, err = _one_line_exit_2(sweep.main, argv + [a.format(tmp=tmp_path) for a in extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def _results_of_main(run_main, checkpoints, tiny_data, output):
    code, _, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, "--no-download",
                            "--group_idxs", 1, 2, "--sparsities", 0.3, 0.6, "--output", output)
    assert code == 0, err


@pytest.mark.slow
def test_report_reads_the_json_of_main_like_its_csv(checkpoints, tiny_data, run_main, tmp_path):
    _results_of_main(run_main, checkpoints, tiny_data, tmp_path / "rows.json")
    write_rows(tmp_path / "rows.csv", read_rows(tmp_path / "rows.json"))
    pages = []
    for name in ("rows.json", "rows.csv"):
        assert report.main([str(tmp_path / name), "--out-dir", str(tmp_path / name.replace(".", "_"))]) == 0
        pages.append((tmp_path / name.replace(".", "_") / "RESULTS.md").read_text())
    assert pages[0] == pages[1] and "| 1 | " in pages[0] and "| 2 | " in pages[0], pages[0]


@pytest.mark.parametrize("name,content,message", [
    ("noise.csv", bytes(range(256)), "cannot read results file"),
    ("noise.json", b"\x89PNG\r\n", "cannot read results file"),
    ("text.json", b"[1, 2]", "must hold a JSON list of rows"),
    ("foreign.csv", b"name,score\na,1\n", "foreign.csv is not a results file of this project (no 'model' column)"),
    ("ragged.csv", b"model,accuracy\nvgg,1,2,3\n", "ragged.csv is corrupt"),
    ("empty.csv", b"", "empty.csv is not a results file of this project"),
    ("words.csv", b"model,dataset,criterion,group,sparsity,method,accuracy\nvgg,c,l1,1,half,default,90\n",
     "words.csv is corrupt (sparsity or accuracy is not a number)"),
])
def test_report_refuses_files_that_are_not_results_in_one_line(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    code, err = _one_line_exit_2(report.main, [tmp_path / name, "--out-dir", tmp_path / "docs"], capsys)
    assert code == 2 and message in err and str(tmp_path / name) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "docs").exists()


def _fuzz_choices(checkpoints, tmp_path):
    """(good values, bad values) per main.py option; a successful run stays tiny."""
    (tmp_path / "file").write_text("x")
    return {
        "--checkpoint": ([checkpoints[("vgg11_bn", 10)], checkpoints["released"]],
                         [checkpoints[("resnet18", 10)], checkpoints[("vgg11_bn", 100)], tmp_path,
                          tmp_path / "missing", f"{tmp_path / 'file'}.zip:x"]),
        "--model-name": (["vgg11_bn"], ["resnet18", "vgg"]),
        "--dataset": (["fashion-mnist"], ["cifar10", "mnist"]),
        "--group_idxs": (["1", "all"], ["99", "-1", "x"]),
        "--sparsities": (["0.5", "0"], ["1", "nan", "-0.2", "x"]),
        "--importance_criteria": (["l1", "lamp", "random"], ["gate", "x"]),
        "--methods": (["default", "intra_fusion"], ["x"]),
        "--device": (["cpu"], ["cuda", "cuda:1", "bogus", ""]),
        "--batch-size": (["48"], ["0", "-3", "x"]),
        "--output": ([tmp_path / "new.csv", tmp_path / "new.json"],
                     [tmp_path / "out.txt", "/proc/x.csv", tmp_path, tmp_path / "file"]),
        "--p": (["2"], ["x", "inf", "-1"]),
        "--schedule": (["uniform", "global"], ["x"]),
        "--max-layer-sparsity": (["0.5"], ["2"]),
        "--repair": (["none", "datafree"], ["x"]),
        "--seed": (["1"], ["-1", "x"]),
        "--save-pruned": ([], ["/proc/pruned", tmp_path / "file"]),
        "--list-groups": ([None], []),
    }


def _noise(rng, source: bytes) -> bytes:
    """Random bytes, random text in a results file's alphabet, or `source` with bytes changed or cut."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 3000))
    if kind == 1:
        return bytes(rng.choice(b'model,accuracy,group\n"0.5x\0') for _ in range(rng.randrange(1, 300)))
    data = bytearray(source)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data[:rng.randrange(1, len(data))] if rng.random() < 0.3 else data)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(25))
def test_random_options_end_in_success_or_one_line(case, checkpoints, tiny_data, run_main, tmp_path, monkeypatch):
    """Seeded random option sets, damaged bytes as checkpoint and as existing results file: every run
    ends with exit 0, or with exit 2 and one line: never a traceback or the usage text."""
    rng = random.Random(case)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--data-dir", tiny_data, "--no-download", "--group_idxs", "1", "--sparsities", "0.5", "--methods",
            "default"]
    choices = _fuzz_choices(checkpoints, tmp_path)
    for option in rng.sample(sorted(choices), rng.randint(1, 3)):
        good, bad = choices[option]
        value = rng.choice(bad if bad and (not good or rng.random() < 0.3) else good)
        argv += [option] if value is None else [option, value]
    if rng.random() < 0.3:
        damaged = tmp_path / "damaged.checkpoint"
        damaged.write_bytes(_noise(rng, checkpoints[("vgg11_bn", 10)].read_bytes()))
        argv += ["--checkpoint", damaged]
    if rng.random() < 0.3:
        row = {"model": "vgg11_bn", "dataset": "fashion-mnist", "criterion": "l1", "group": 1, "sparsity": 0.5,
               "method": "default", "accuracy": 90.0}
        damaged = tmp_path / f"damaged.{rng.choice(['csv', 'json'])}"
        write_rows(damaged, [row])
        damaged.write_bytes(_noise(rng, damaged.read_bytes()))
        argv += ["--output", damaged]
    code, _, err = run_main(*argv)
    assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1), (argv, err)
