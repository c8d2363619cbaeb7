"""Bad destinations, checkpoints and results files are refused before any work, in one line."""
import multiprocessing
import os
import stat
import zipfile

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
