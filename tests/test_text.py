"""The byte-level corpus and language-model helpers of the experiment harness (experiments/text.py)."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from torch_pruning_ext.experiments.data import DatasetUnavailable
from torch_pruning_ext.experiments.text import consecutive_windows, load_corpus, perplexity, windows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train_lm  # noqa: E402


def _corpus(folder: Path, entries: int = 30) -> Path:
    folder.mkdir()
    text = "\n%\n".join(f"entry number {i}" for i in range(entries))
    (folder / "jokes").write_text(text + "\n")
    (folder / "jokes.dat").write_bytes(b"\0\1\2")  # fortune's index files are not text
    (folder / "jokes.u8").symlink_to(folder / "jokes")  # nor are the UTF-8 aliases a second copy
    return folder


def test_every_tenth_entry_is_held_out_and_index_files_are_skipped(tmp_path):
    train, validation = load_corpus(_corpus(tmp_path / "f"))
    held_out = bytes(validation.tolist()).decode()
    assert held_out == "".join(f"entry number {i}\n\n" for i in (0, 10, 20))
    assert "entry number 1\n" in bytes(train.tolist()).decode() and "entry number 10\n" not in bytes(train.tolist()).decode()


def test_a_missing_corpus_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetUnavailable, match="apt-get install fortunes"):
        load_corpus(tmp_path / "nothing")


def test_windows_cover_the_data_in_order_and_random_windows_are_contiguous():
    data = torch.arange(200, dtype=torch.uint8)
    cut = consecutive_windows(data, context=16)
    assert cut.shape == (12, 17) and cut.dtype == torch.long
    assert torch.equal(cut[1, 0], cut[0, -1]) and torch.equal(cut.flatten()[:17], torch.arange(17))
    sample = windows(data, 5, context=16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample - sample[:, :1], torch.arange(17).expand(5, 17))


class Uniform(nn.Module):
    """Every next byte equally likely: the perplexity is the vocabulary size."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, 256) * self.scale


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    data = consecutive_windows(torch.randint(0, 256, (1000,), dtype=torch.uint8), context=32)
    assert math.isclose(perplexity(Uniform(), data, batch_size=7), 256, rel_tol=1e-6)


@pytest.mark.parametrize("flag, value, message", [("--steps", "0", "--steps must be positive, got 0"),
                                                  ("--lr", "-1", "--lr must be positive, got -1.0")])
def test_train_lm_refuses_bad_settings_in_one_line(flag, value, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train_lm.parse_args(["--output", "x.checkpoint", flag, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err
