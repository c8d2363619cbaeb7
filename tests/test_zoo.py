"""Models nobody here wrote: torchvision builders with random weights and randomised BatchNorm
(scripts/zoo.py builds them and writes docs/ZOO.md), plus small grouped-convolution models."""
import copy
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision

from torch_pruning_ext import IntraFusionPruner, OptimalTransport

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import transformer_zoo  # noqa: E402
import zoo  # noqa: E402

pytestmark = pytest.mark.slow  # every model of the zoo, real size

# what may make a group fall back: torchvision's attention, whose inner width is the residual width
# (never BatchNorm, LayerNorm or a scale parameter)
ALLOWED_FALLBACKS = ("MultiheadAttention",)
SMALL = ["resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
         "googlenet", "squeezenet1_1", "mnasnet0_5", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "vit_tiny"]
WIDE = ["wide_resnet50_2", "vgg11_bn", "alexnet"]  # 4096-wide or very wide layers: fusion takes longer


@pytest.mark.parametrize("name, message", [("shufflenet_v2_x0_5", "channel-shuffle views"),
                                           ("swin_t", "features.1.0.attn (shifted-window attention (Swin))")])
def test_models_torch_pruning_cannot_trace_are_refused_at_once(name, message):
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    with pytest.raises(ValueError, match=re.escape(message)):
        IntraFusionPruner(model, torch.randn(1, 3, 64, 64))


class IdentityTransport:
    """A coupling that moves every kept channel onto itself and nothing else: fusion = plain pruning."""

    def coupling(self, features, importance, kept):
        plan = torch.zeros(len(features), len(kept), dtype=torch.float64)
        plan[kept, torch.arange(len(kept))] = 1.0
        return plan


@pytest.mark.parametrize("name", SMALL + WIDE)
def test_whole_network_prunes_fuses_and_matches_metapruner(name):
    default, fused = zoo.run_family(name, 0.5)
    assert default["output_ok"] and fused["output_ok"], "forward shape or values broken"
    assert fused["params_after"] == default["params_after"] < 0.5 * default["params_before"]
    assert abs(fused["params_after"] / fused["metapruner_params"] - 1) < 0.01
    reasons = [part.split(" x ", 1)[1] for part in fused["fallbacks"].split("; ") if part]
    assert all(reason.split(" via ")[0] in ALLOWED_FALLBACKS for reason in reasons), reasons
    assert fused["fused"] + sum(int(part.split(" x ")[0]) for part in fused["fallbacks"].split("; ") if part) \
        == fused["groups"]


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf", "densenet121", "convnext_tiny", "mobilenet_v3_small",
                                  "vit_tiny"])
def test_identity_map_equals_plain_pruning_bitwise(name):
    builder, side = zoo.FAMILIES[name]
    base = zoo.randomized(builder)
    example = torch.randn(1, 3, side, side)
    models = {}
    for label, transport in (("plain", None), ("identity", IdentityTransport())):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            IntraFusionPruner(model, example).prune("all", 0.5, transport, fusion_rule="function_preserving")
        models[label] = model.state_dict()
    assert models["plain"].keys() == models["identity"].keys()
    for key, value in models["plain"].items():
        assert torch.equal(value, models["identity"][key]), key


class Grouped(nn.Module):
    """conv -> BN -> ReLU -> grouped conv (groups=2) -> BN -> ReLU -> conv, in 1-D or 2-D."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.body = nn.Sequential(conv(3, 8, 3, padding=1), bn(8), nn.ReLU(), conv(8, 8, 3, padding=1, groups=2),
                                  bn(8), nn.ReLU(), conv(8, 6, 1))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.body(x).flatten(2).mean(2))


def _grouped(dims: int, seed: int = 0) -> Grouped:
    torch.manual_seed(seed)
    model = zoo.randomized(lambda: Grouped(dims), seed)
    return model


class LocalFirstHalf(tp.importance.Importance):
    """In every block of 4 channels, local positions 0, 1 matter and 2, 3 do not."""

    def __call__(self, group):
        n = len(group[0].idxs)
        return torch.tensor([2.0, 2.0, 1.0, 1.0]).repeat(n // 4)


def _silence(model, channels):
    """Make body.0's channels output exactly zero after BN and ReLU."""
    with torch.no_grad():
        conv, bn = model.body[0], model.body[1]
        for tensor in (conv.weight, conv.bias, bn.running_mean, bn.bias):
            tensor[channels] = 0
    return model


@pytest.mark.parametrize("dims", [1, 2])
def test_removing_zero_output_channels_of_a_grouped_conv_input_changes_no_logit(dims):
    model = _silence(_grouped(dims), [2, 3, 6, 7])  # local positions 2, 3 of both blocks of the grouped conv
    x = torch.randn(5, 3, *(16,) * dims)
    with torch.no_grad():
        before = model(x)
    pruner = IntraFusionPruner(model, x[:1])
    index = [info.root for info in pruner.groups()].index("body.0")
    result, = pruner.prune([index], 0.5)
    assert result.pruned == [2, 3, 6, 7]
    assert model.body[3].in_channels == 4 and model.body[3].weight.shape[1] == 2
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-6


@pytest.mark.parametrize("dims", [1, 2])
def test_pruning_a_grouped_conv_input_equals_silencing_the_same_channels(dims):
    model = _grouped(dims, seed=3)
    original = copy.deepcopy(model)
    x = torch.randn(5, 3, *(16,) * dims)
    pruner = IntraFusionPruner(model, x[:1])
    index = [info.root for info in pruner.groups()].index("body.0")
    result, = pruner.prune([index], 0.5)
    assert len(result.pruned) == 4
    assert [c for c in result.pruned if c < 4] == [c - 4 for c in result.pruned if c >= 4]  # alike in both blocks
    with torch.no_grad():
        assert (model(x) - _silence(original, result.pruned)(x)).abs().max() < 1e-5


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("root", ["body.0", "body.3"])
def test_twins_within_conv_blocks_merge_exactly_under_the_function_preserving_rule(dims, root):
    model = _grouped(dims)
    with torch.no_grad():  # local channels 2, 3 of each block of 4 are twins of 0, 1 (weights, bias, BN)
        conv, bn = dict(model.named_modules())[root], model.body[1 if root == "body.0" else 4]
        for block in (0, 4):
            for source, twin in ((block, block + 2), (block + 1, block + 3)):
                conv.weight[twin] = conv.weight[source]
                conv.bias[twin] = conv.bias[source]
                for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    tensor[twin] = tensor[source]
    x = torch.randn(5, 3, *(16,) * dims)
    with torch.no_grad():
        before = model(x)
    pruner = IntraFusionPruner(model, x[:1], importance=LocalFirstHalf())
    index = [info.root for info in pruner.groups()].index(root)
    result, = pruner.prune([index], 0.5, OptimalTransport(), fusion_rule="function_preserving")
    assert result.fused and sorted(result.pruned) == [2, 3, 6, 7]
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-5


class TwoGrouped(nn.Module):
    """conv -> grouped conv (groups=2) -> grouped conv (groups=2) -> head: 6 channels, 3 per block."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.c = nn.Conv2d(6, 6, 1, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.c(torch.relu(self.b(torch.relu(self.a(x))))).mean((2, 3)))


def test_a_grouped_conv_pruned_to_one_channel_per_block_stays_grouped():
    torch.manual_seed(0)
    model = TwoGrouped().eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = IntraFusionPruner(model, x[:1])
    results = pruner.prune("all", 0.5, OptimalTransport(), fusion_rule="function_preserving")
    assert all(r.fused for r in results)
    for result in results:  # every block lost the same local positions
        assert [c for c in result.pruned if c < 3] == [c - 3 for c in result.pruned if c >= 3]
    assert model(x).shape == (2, 3)


def test_global_pruning_with_conv_blocks_respects_the_cap():
    torch.manual_seed(0)
    model = TwoGrouped().eval()
    x = torch.randn(2, 3, 8, 8)
    results = IntraFusionPruner(model, x[:1]).prune("all", 0.6, global_pruning=True, max_group_sparsity=0.5)
    assert all(len(r.pruned) <= r.channels // 2 for r in results)
    assert model(x).shape == (2, 3)


class CatIntoGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.grouped(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def test_a_group_that_cannot_be_pruned_consistently_stops_before_any_change():
    model = CatIntoGrouped().eval()
    shapes = [p.shape for p in model.parameters()]
    pruner = IntraFusionPruner(model, torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="takes channels from several groups"):
        pruner.prune("all", 0.5)
    assert [p.shape for p in model.parameters()] == shapes


@pytest.mark.parametrize("name", ["mobilenet_v2", "vit_tiny"])
def test_saved_pruned_zoo_models_load_back_exactly(name, tmp_path):
    from torch_pruning_ext import load_pruned, register_builder, save_pruned
    builder, side = zoo.FAMILIES[name]
    register_builder(f"zoo_{name}", lambda num_classes: builder())
    model = zoo.randomized(builder)
    x = torch.randn(2, 3, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        IntraFusionPruner(model, x[:1]).prune("all", 0.5, OptimalTransport(), fusion_rule="function_preserving")
    save_pruned(model, tmp_path / "m.pt", f"zoo_{name}", 10)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "m.pt")(x), model(x))


@pytest.mark.parametrize("name", list(transformer_zoo.FAMILIES))
def test_hugging_face_families_prune_whole_with_heads_and_never_break(name):
    """Every family: runs, same output shape, finite; heads pruned in every attention block; nothing
    left unpruned except Phi-3's fused gate_up_proj (torch-pruning does not follow its chunk)."""
    default, fused = transformer_zoo.run_family(name, 0.5)
    for row in (default, fused):
        assert row["output_ok"] and row["params_after"] < 0.45 * row["params_before"]
        assert row["head_groups"] == 2 and all(kept < total for kept, total in
                                               (map(int, h.split("/")) for h in row["heads"].split()))
        assert ("gate_up_proj" in row["skipped"] and "does not follow a split" in row["skipped"]) if name == "phi3" \
            else row["skipped"] == ""
    # a tied input embedding and output head (GPT-2, OPT, Gemma) are tied again after plain pruning; after a
    # merge they stay two tensors (the embedding is averaged as a producer, the head summed as a consumer)
    tied = name in ("gpt2", "opt", "gemma")
    assert fused["params_after"] - default["params_after"] == (transformer_zoo.VOCAB * transformer_zoo.WIDTH // 2
                                                               if tied else 0)
    # only heads, and the gated MLPs of the LLaMA-style families, are pruned without fusion
    gated = "2 x gated channels (their outputs are multiplied), which no map of the rows merges"
    expected = {"2 x whole attention heads"} | ({gated} if name in ("llama", "llama_gqa", "llama_mqa", "mistral",
                                                                     "qwen2", "gemma") else set())
    assert set(fused["fallbacks"].split("; ")) == expected
