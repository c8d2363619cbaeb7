"""Calibration sequences sampled from a language model itself (sampling.py): what the model predicts
is what comes out, seeded, in the form of the example inputs, with and without a key-value cache."""
import pytest
import torch
import torch.nn as nn

from torch_pruning_ext import sample_calibration


class Counting(nn.Module):
    """Predicts token (t + 1) mod 10 after token t, with near certainty."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 10)
        self.hidden = nn.Linear(10, 16)
        self.out = nn.Linear(16, 10)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(10))
            self.hidden.weight.zero_()
            self.hidden.weight[:10] = torch.eye(10)
            self.hidden.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()
            self.out.weight[:, :10] = 50 * torch.roll(torch.eye(10), 1, dims=0)

    def forward(self, input_ids):
        return self.out(torch.relu(self.hidden(self.embed(input_ids))))


def test_sequences_follow_what_the_model_predicts_in_the_example_form():
    example = {"input_ids": torch.tensor([[3, 4, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    inputs, report = sample_calibration(Counting(), example, n=5, batch_size=2)
    ids = inputs["input_ids"]
    assert ids.shape == (5, 6) and ids.dtype == torch.long and torch.equal(inputs["attention_mask"], torch.ones(5, 6))
    assert torch.equal((ids - ids[:, :1]) % 10, torch.arange(6).expand(5, 6))  # counting from each start
    assert set(ids[:, 0].tolist()) <= {3, 4, 5, 6, 7, 8} and report.sequences == 5 and not report.cached


class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(7))

    def forward(self, ids):
        return self.bias.expand(*ids.shape, 7)


def test_sampling_is_seeded_and_a_plain_tensor_example_gives_a_tensor():
    example = torch.randint(0, 7, (1, 9))
    first, _ = sample_calibration(Uniform(), example, n=4, seed=3)
    again, _ = sample_calibration(Uniform(), example, n=4, seed=3)
    other, _ = sample_calibration(Uniform(), example, n=4, seed=4)
    assert isinstance(first, torch.Tensor) and first.shape == (4, 9)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("bad, message", [(dict(example_inputs=torch.randn(1, 6)), "token ids"),
                                          (dict(n=0), "number of sequences must be a positive integer, got 0"),
                                          (dict(temperature=0.0), "temperature must be positive")])
def test_bad_requests_are_refused_in_one_line(bad, message):
    arguments = dict(model=Uniform(), example_inputs=torch.randint(0, 7, (1, 4))) | bad
    with pytest.raises(ValueError, match=message):
        sample_calibration(**arguments)
