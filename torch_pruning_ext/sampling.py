"""Calibration text with no data: token sequences sampled from the language model itself.

A causal language model gives the probability of each next token, so sequences drawn from it
follow the statistics its layers were trained on, as images matched to BatchNorm statistics do for
a CNN (synthesis.py): the least-squares reconstruction can refit a pruned model on them without any
corpus. Each sequence starts from a token of the example inputs; the model's key-value cache is
used when it has one (Hugging Face models), else every step recomputes the whole prefix.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .inputs import tensors_of
from .modes import eval_mode

SAMPLED_SEQUENCES = 256  # sequences sampled by default by compress(calibration="synthetic")


@dataclass
class SamplingReport:
    """What sampling did: sequences, tokens per sequence, seconds, and whether a key-value cache was used."""
    sequences: int
    length: int
    seconds: float
    cached: bool


def token_ids(example_inputs) -> torch.Tensor | None:
    """The token ids of example inputs (an integer tensor, or a dict holding "input_ids"), else None."""
    ids = example_inputs.get("input_ids") if isinstance(example_inputs, dict) else example_inputs
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point() and ids.dtype != torch.bool:
        return ids
    return None


def _call(model, ids, as_dict: bool, **extra):
    return model(input_ids=ids, **extra) if as_dict or extra else model(ids)


def _cache_keyword(model: nn.Module) -> str:
    """The keyword a Hugging Face model takes its key-value cache by ("cache" since transformers 5.x)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


@torch.no_grad()
def _sample_batch(model, first: torch.Tensor, length: int, temperature: float, generator, as_dict: bool):
    """Extend `first` (batch, 1) to (batch, length) tokens; returns the ids and whether a cache served."""
    ids, cache, keyword = first, None, _cache_keyword(model)
    try:
        output = _call(model, ids, as_dict, use_cache=True)
        cache = getattr(output, keyword, None)
    except TypeError:  # a model without the use_cache keyword
        output = _call(model, ids, as_dict)
    for _ in range(length - 1):
        # the first output, as everywhere in the library: a Hugging Face ModelOutput's logits
        probabilities = torch.softmax(tensors_of(output)[0][:, -1].double() / temperature, dim=-1)
        token = torch.multinomial(probabilities, 1, generator=generator).to(ids.dtype)
        ids = torch.cat([ids, token], dim=1)
        if cache is not None:
            output = _call(model, token, as_dict, use_cache=True, **{keyword: cache})
            cache = getattr(output, keyword)
        else:
            output = _call(model, ids, as_dict)
    return ids, cache is not None


def sample_calibration(model: nn.Module, example_inputs, n: int = SAMPLED_SEQUENCES, length: int | None = None,
                       temperature: float = 1.0, batch_size: int = 64, seed: int = 0,
                       progress=None) -> tuple[object, SamplingReport]:
    """`n` token sequences of `length` tokens (default: the example's) sampled from `model`, in the form
    of the example inputs (an id tensor, or a dict with "input_ids" and, if the example has one, an
    all-ones "attention_mask"). Seeded: the same seed gives the same sequences on one machine.
    progress(done, total) is called per batch."""
    ids = token_ids(example_inputs)
    if ids is None:
        raise ValueError("sampled calibration needs a language model called with token ids: example_inputs as a 2-D "
                         "integer tensor or a dict with 'input_ids'")
    length = ids.shape[1] if length is None else length
    for name, value in (("number of sequences", n), ("length", length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"the {name} must be a positive integer, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    starts = ids.flatten()[torch.randint(0, ids.numel(), (n,), generator=generator, device=ids.device)][:, None]
    as_dict = isinstance(example_inputs, dict)
    started, batches, cached = time.perf_counter(), [], False
    with eval_mode(model):
        for index, begin in enumerate(range(0, n, batch_size)):
            sequences, cached = _sample_batch(model, starts[begin:begin + batch_size], length, temperature,
                                              generator, as_dict)
            batches.append(sequences)
            if progress is not None:
                progress(index + 1, -(-n // batch_size))
    sampled = torch.cat(batches)
    inputs = sampled
    if as_dict:
        inputs = {"input_ids": sampled}
        if "attention_mask" in example_inputs:
            inputs["attention_mask"] = torch.ones_like(sampled, dtype=example_inputs["attention_mask"].dtype)
    return inputs, SamplingReport(n, length, time.perf_counter() - started, cached)
