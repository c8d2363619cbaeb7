"""A byte-level language-modelling corpus available offline, and a small decoder-only LM on it.

The corpus is the English text of Debian's `fortunes` package (`apt-get install fortunes`: quotations,
poems, jokes and definitions under /usr/share/games/fortunes, 2.6 MB), split at its "%" separators;
every tenth entry is held out for validation. Tokens are bytes (vocabulary 256), so no tokenizer is
needed. The model is a Hugging Face `LlamaForCausalLM` (grouped-query attention, rotary positions,
RMSNorm, gated MLP: the layout users bring), built from a config without any download; `transformers`
is imported only here, in the experiment harness.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..inputs import tensors_of
from ..modes import eval_mode
from .data import DatasetUnavailable

FORTUNES_DIR = Path("/usr/share/games/fortunes")
VALIDATION_EVERY = 10  # every tenth entry is held out
CONTEXT = 128
VOCAB = 256
LM_CONFIG = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=CONTEXT,
                 tie_word_embeddings=False, use_cache=False)


def load_corpus(directory: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, validation bytes) as uint8 tensors, from the fortune files in `directory`."""
    folder = Path(directory) if directory is not None else FORTUNES_DIR
    files = sorted(p for p in folder.glob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".dat") \
        if folder.is_dir() else []
    if not files:
        raise DatasetUnavailable(f"no fortune files in {folder}: install them with `apt-get install fortunes` "
                                 "(Debian/Ubuntu) or pass the folder that holds them")
    entries = [entry.strip() + b"\n\n" for path in files for entry in path.read_bytes().split(b"\n%\n")
               if entry.strip()]
    train = b"".join(e for i, e in enumerate(entries) if i % VALIDATION_EVERY)
    validation = b"".join(e for i, e in enumerate(entries) if not i % VALIDATION_EVERY)
    return (torch.frombuffer(bytearray(train), dtype=torch.uint8),
            torch.frombuffer(bytearray(validation), dtype=torch.uint8))


def windows(data: torch.Tensor, count: int, context: int = CONTEXT, generator=None) -> torch.Tensor:
    """`count` random windows of context + 1 bytes (inputs and next-byte targets), as int64."""
    starts = torch.randint(0, len(data) - context - 1, (count,), generator=generator)
    return data[starts[:, None] + torch.arange(context + 1)].long()


def consecutive_windows(data: torch.Tensor, context: int = CONTEXT, limit: int | None = None) -> torch.Tensor:
    """The data cut into non-overlapping windows of context + 1 bytes (the last byte of each is the
    first of the next), at most `limit` of them."""
    count = (len(data) - 1) // context
    if limit is not None:
        count = min(count, limit)
    return data[torch.arange(count)[:, None] * context + torch.arange(context + 1)].long()


def build_language_model(config: dict | None = None) -> nn.Module:
    """A LlamaForCausalLM from LM_CONFIG (or `config`), random weights, no download."""
    import transformers
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**(config or LM_CONFIG)))


@torch.inference_mode()
def perplexity(model: nn.Module, data: torch.Tensor, batch_size: int = 32) -> float:
    """exp(mean next-byte cross-entropy) over the windows `data` (from consecutive_windows)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(data), batch_size):
            batch = data[start:start + batch_size]
            logits = tensors_of(model(input_ids=batch[:, :-1]))[0].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += batch[:, 1:].numel()
    if not count:
        raise ValueError("cannot compute perplexity on no data")
    return math.exp(total / count)
