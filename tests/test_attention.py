"""Attention heads as pruning units (attention.py): found in the timm and Hugging Face layouts, sliced
exactly (the pruned model computes what the original computes with those heads' output columns
zeroed), head-count attributes kept consistent, duplicated heads merged exactly, layouts not
understood left unpruned with the reason."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from torch_pruning_ext import IntraFusionPruner, OptimalTransport, compress, list_groups, sample_calibration
from torch_pruning_ext.attention import find_attention, zero_heads
from torch_pruning_ext.experiments.models import vit_tiny


def _rotate(x):
    """Rotary position embedding (the LLaMA form: halves swapped, cos/sin by position)."""
    tokens, dim = x.shape[-2], x.shape[-1]
    angle = torch.arange(tokens)[:, None] / 100 ** (torch.arange(dim // 2) / (dim // 2))
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    first, second = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + torch.cat([-second, first], -1) * sin


class GroupedQueryAttention(nn.Module):
    """The Hugging Face LLaMA layout written by hand: separate q/k/v/o, rotary, key-value heads repeated
    by expand + reshape for grouped-query attention, head counts in attributes."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x):
        return self.attend(x, self.q_proj, self.k_proj, self.v_proj, self.o_proj)

    def attend(self, x, q_layer, k_layer, v_layer, o_layer):
        b, t, _ = x.shape
        q = _rotate(q_layer(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2))
        k = _rotate(k_layer(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2))
        v = v_layer(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        repeats = self.num_heads // self.num_key_value_heads
        k, v = (z[:, :, None].expand(b, self.num_key_value_heads, repeats, t, self.head_dim)
                .reshape(b, self.num_heads, t, self.head_dim) for z in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o_layer(out.transpose(1, 2).reshape(b, t, -1))


class Layer(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = GroupedQueryAttention(dim, heads, kv_heads)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(dim, 48), nn.Linear(dim, 48), nn.Linear(48, dim)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    """A decoder-only language model in the Hugging Face layout, called with token ids."""

    def __init__(self, heads=4, kv_heads=2, dim=32, vocab=40):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Layer(dim, heads, kv_heads) for _ in range(2)])
        self.norm, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _hf_llama(kv_heads):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads,
                                      max_position_embeddings=32, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _random_ln(model):
    """LayerNorms with non-trivial scales and shifts, as a trained model has."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model.eval()


MODELS = {
    "vit (fused qkv)": (lambda: vit_tiny(10), lambda: torch.randn(2, 3, 32, 32)),
    "lm, multi-head": (lambda: TinyLM(4, 4), lambda: torch.randint(0, 40, (2, 10))),
    "lm, grouped-query": (lambda: TinyLM(4, 2), lambda: torch.randint(0, 40, (2, 10))),
    "lm, multi-query": (lambda: TinyLM(4, 1), lambda: torch.randint(0, 40, (2, 10))),
    "hf llama, grouped-query": (lambda: _hf_llama(2), lambda: {"input_ids": torch.randint(0, 40, (2, 10))}),
}


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _head_indices(pruner):
    return list(range(len(pruner.roots), pruner.num_groups))


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_heads_compute_what_zeroing_them_computes(name):
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    original = _random_ln(build())
    x = inputs()
    model = copy.deepcopy(original)
    pruner = IntraFusionPruner(model, x)
    blocks = find_attention(original)
    assert len(_head_indices(pruner)) == len(blocks) == (4 if name.startswith("vit") else 2)
    results = pruner.prune(_head_indices(pruner), 0.5)
    for block, result in zip(blocks, results):
        assert result.skipped_reason is None and len(result.pruned) == block.units // 2
        zero_heads(original, block, result.pruned)
    assert torch.allclose(_run(model, x), _run(original, x), atol=1e-5)
    attention = [m for m in model.modules() if hasattr(m, "o_proj") or hasattr(m, "proj")]
    for module in attention:
        heads = getattr(module, "num_heads", None) or getattr(module, "config").num_attention_heads
        out_proj = getattr(module, "o_proj", None) or module.proj
        assert out_proj.in_features == 2 * (out_proj.out_features // 4)  # half the heads, same head width
        assert heads == 2  # the attribute (or the shared config) forward() reads says so


@pytest.mark.parametrize("sparsity, pruned", [(0.3, 1), (0.5, 2), (0.6, 2), (0.9, 3)])
def test_the_head_count_is_rounded_to_the_nearest_whole_head(sparsity, pruned):
    model = TinyLM(4, 4).eval()
    pruner = IntraFusionPruner(model, torch.randint(0, 40, (1, 6)))
    results = pruner.prune(_head_indices(pruner), sparsity)
    assert [len(r.pruned) for r in results] == [pruned, pruned]


def test_grouped_query_attention_loses_whole_key_value_groups():
    model = TinyLM(4, 2).eval()
    pruner = IntraFusionPruner(model, torch.randint(0, 40, (1, 6)))
    pruner.prune(_head_indices(pruner), 0.5)
    attn = model.layers[0].self_attn
    assert (attn.num_heads, attn.num_key_value_heads) == (2, 1)
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (16, 8, 16)


def test_duplicated_heads_merge_without_changing_the_outputs():
    torch.manual_seed(1)
    model = vit_tiny(10).eval()
    qkv, proj = model.blocks[0].attn.qkv, model.blocks[0].attn.proj
    width = qkv.out_features // 3 // 4
    with torch.no_grad():
        for part in range(3):  # heads 2 and 3 are copies of heads 0 and 1, with small output columns
            for twin, source in ((2, 0), (3, 1)):
                rows = part * 4 * width + twin * width + torch.arange(width)
                qkv.weight[rows] = qkv.weight[rows - (twin - source) * width]
                qkv.bias[rows] = qkv.bias[rows - (twin - source) * width]
        proj.weight[:, 2 * width:] *= 0.01
    x = torch.randn(3, 3, 32, 32)
    before = _run(model, x)
    pruner = IntraFusionPruner(model, x[:1])
    first = len(pruner.roots)
    plain = copy.deepcopy(model)
    [result] = pruner.prune([first], 0.5, OptimalTransport(), fusion_rule="function_preserving")
    assert result.pruned == [2, 3] and result.fused and result.fallback_reason is None
    assert proj.weight.shape[1] == 2 * width
    assert torch.allclose(_run(model, x), before, atol=1e-5)
    # without the merge the outputs move: the test can tell
    IntraFusionPruner(plain, x[:1]).prune([first], 0.5)
    assert not torch.allclose(_run(plain, x), before, atol=1e-3)


class HeadMajorQKV(nn.Module):
    """A fused qkv laid out [head, q|k|v, dim] (GPT-NeoX style), not the [q|k|v, head, dim] the names suggest."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, self.num_heads, 3, -1).permute(3, 0, 2, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class HeadMajorNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(8, 32), HeadMajorQKV(), nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)).mean(1))


def test_a_head_layout_not_understood_is_left_unpruned_with_the_reason():
    model = HeadMajorNet().eval()
    weights = model.attn.qkv.weight.clone()
    pruner = IntraFusionPruner(model, torch.randn(2, 5, 8))
    with pytest.warns(UserWarning, match="head layout not understood"):
        [result] = pruner.prune(_head_indices(pruner), 0.5)
    assert result.skipped_reason and "head layout not understood" in result.skipped_reason
    assert torch.equal(model.attn.qkv.weight, weights) and model.attn.num_heads == 4


class IdentityTransport:
    def coupling(self, features, importance, kept):
        plan = torch.zeros(len(features), len(kept), dtype=torch.float64)
        plan[kept, torch.arange(len(kept))] = 1.0
        return plan


@pytest.mark.parametrize("name", ["vit (fused qkv)", "lm, grouped-query"])
def test_identity_map_equals_plain_pruning_bitwise_with_norms_and_embeddings_in_the_groups(name):
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    base, x = _random_ln(build()), inputs()
    states = {}
    for label, transport in (("plain", None), ("identity", IdentityTransport())):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = IntraFusionPruner(model, x).prune("all", 0.5, transport, fusion_rule="function_preserving")
        if transport is not None:  # the residual width (LayerNorms, embeddings) and the ungated MLPs are fused
            assert all(r.fused for r in results if r.producers and not r.producers[0].endswith(("qkv", "q_proj"))
                       and "gated" not in (r.fallback_reason or ""))
            assert next(r for r in results if r.group == 0).fused  # the residual width
        states[label] = model.state_dict()
    for key, value in states["plain"].items():
        assert torch.equal(value, states["identity"][key]), key


def test_a_gated_mlp_is_pruned_not_merged_and_an_ungated_one_is_merged():
    """silu(gate(x)) * up(x): an average of two neurons' rows is not the average of their products."""
    for model, x, gated in ((TinyLM(4, 4).eval(), torch.randint(0, 40, (1, 6)), True),
                            (vit_tiny(10).eval(), torch.randn(1, 3, 32, 32), False)):
        pruner = IntraFusionPruner(model, x)
        mlp = [i for i, g in enumerate(pruner.groups()) if g.root.endswith(("up_proj", "fc1"))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = pruner.prune(mlp, 0.5, OptimalTransport(), fusion_rule="function_preserving")
        assert [r.fused for r in results] == [not gated] * len(mlp)
        if gated:
            assert all("gate_proj and" in r.fallback_reason and "gated channels" in r.fallback_reason for r in results)


def test_compress_prunes_heads_mlp_and_residual_width_of_a_hugging_face_llama_with_grouped_query_attention():
    model = _hf_llama(2).eval()
    ids = torch.randint(0, 40, (16, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no endless group search, nothing broken
        warnings.filterwarnings("ignore", message=".*cannot be fused.*")
        small, summary = compress(model, {"input_ids": ids[:1]}, 0.5, "fold", {"input_ids": ids})
    assert summary.channels["model.layers.0.self_attn.q_proj"] == [32, 16]
    assert summary.channels["model.layers.0.self_attn.k_proj"] == [16, 8]
    assert summary.channels["model.layers.0.mlp.up_proj"] == [48, 24]
    assert summary.channels["model.layers.0.mlp.down_proj"] == [32, 16]
    assert not summary.skipped_groups
    # heads and the gated MLPs are pruned without merging, the residual width is merged
    assert set(summary.unfused_groups) == {i for i, g in enumerate(list_groups(model, {"input_ids": ids[:1]}))
                                          if g.root.endswith(("self_attn", "up_proj"))}
    assert summary.fused_groups == 1
    assert small.model.layers[0].self_attn.num_key_value_groups == 2
    logits = _run(small, {"input_ids": ids[:4]})
    assert logits.shape == (4, 10, 40) and torch.isfinite(logits).all()


def test_head_sparsity_zero_keeps_every_head_and_bad_values_are_refused():
    model = TinyLM(4, 2).eval()
    ids = torch.randint(0, 40, (8, 6))
    small, summary = compress(model, ids[:1], 0.5, "default", head_sparsity=0.0)
    assert summary.channels["layers.0.self_attn.q_proj"] == [32, 32]
    assert summary.channels["layers.0.up_proj"] == [48, 24]
    with pytest.raises(ValueError, match=r"head_sparsity must be a number in \[0, 1\), got 1.5"):
        compress(model, ids[:1], 0.5, head_sparsity=1.5)
    assert math.isfinite(float(_run(small, ids).sum()))


def test_with_calibration_heads_are_ranked_by_what_they_add_to_the_output():
    """Head 1 has the largest weights but adds nothing (zero output columns): magnitude keeps it, the
    contribution on calibration inputs prunes it."""
    torch.manual_seed(0)
    model = vit_tiny(10).eval()
    attn = model.blocks[0].attn
    width = 24
    with torch.no_grad():
        for part in range(3):
            attn.qkv.weight[part * 96 + width:part * 96 + 2 * width] *= 10
        attn.proj.weight[:, width:2 * width] = 0
    images = torch.randn(16, 3, 32, 32)
    pruner = IntraFusionPruner(copy.deepcopy(model), images[:1], head_inputs=images)
    [result] = pruner.prune([len(pruner.roots)], 0.25)
    assert result.pruned == [1]
    magnitude = IntraFusionPruner(copy.deepcopy(model), images[:1])
    [result] = magnitude.prune([len(magnitude.roots)], 0.25)
    assert result.pruned != [1]
    for calibration, zero_head_left in ((None, True), (images, False)):  # compress ranks by contribution given data
        small, _ = compress(model, images[:1], 0.25, "default", calibration, repair="none", ignored_layers=["patch_embed"])
        columns = small.blocks[0].attn.proj.weight.reshape(96, -1, width)
        assert bool((columns.abs().sum((0, 2)) == 0).any()) == zero_head_left


def test_a_hugging_face_model_samples_with_its_cache_and_compress_reconstructs_on_the_samples():
    torch.manual_seed(0)
    model = _hf_llama(2).eval()
    example = {"input_ids": torch.randint(0, 40, (1, 10))}
    inputs, report = sample_calibration(model, example, n=6, batch_size=4)
    assert report.cached and inputs["input_ids"].shape == (6, 10)
    small, summary = compress(model, example, 0.5, "fold", "synthetic", calibration_samples=32)
    assert summary.repair == "reconstruct" and summary.synthesis["sequences"] == 32 and summary.synthesis["cached"]
    assert summary.repaired_layers and torch.isfinite(small(**example).logits).all()


def test_a_vit_with_pruned_heads_saves_and_loads_back_exactly(tmp_path):
    from torch_pruning_ext import load_pruned, save_pruned
    torch.manual_seed(0)
    model = _random_ln(vit_tiny(10))
    x = torch.randn(3, 3, 32, 32)
    small, _ = compress(model, x[:1], 0.5, "fold", x, ignored_layers=None)
    save_pruned(small, tmp_path / "vit.pt", "vit_tiny", 10)
    loaded = load_pruned(tmp_path / "vit.pt")
    assert loaded.blocks[0].attn.num_heads == 2
    assert torch.equal(_run(loaded, x), _run(small, x))


def _metapruner_params(model, example, heads: dict, output_layer) -> int:
    """Parameters after torch-pruning's own MetaPruner prunes half of everything, half of the heads too."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=[output_layer(model)],
                                      num_heads={layer(model): count for layer, count in heads.items()},
                                      prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5)
        pruner.step()
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["vit (fused qkv)", "hf llama, multi-head"])
def test_parameter_counts_match_torch_prunings_own_pruner_with_heads(name):
    """(MetaPruner's group search does not end on grouped-query attention, VainF/Torch-Pruning#527.)"""
    if name.startswith("vit"):
        model, x = vit_tiny(10).eval(), torch.randn(1, 3, 32, 32)
        heads = {(lambda m, i=i: m.blocks[i].attn.qkv): 4 for i in range(4)}
        output = (lambda m: m.head)
    else:
        model, x = _hf_llama(4).eval(), {"input_ids": torch.randint(0, 40, (1, 10))}
        heads = {(lambda m, i=i, p=p: getattr(m.model.layers[i].self_attn, p)): 4 for i in range(2)
                 for p in ("q_proj", "k_proj", "v_proj")}
        output = (lambda m: m.lm_head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, summary = compress(model, x, 0.5, "default", repair="none")
    assert summary.params_after == _metapruner_params(model, x, heads, output) < 0.3 * summary.params_before


class UnnamedAttention(GroupedQueryAttention):
    """Grouped-query attention whose projections have names this library does not look for."""

    def __init__(self):
        super().__init__()
        self.wquery, self.wkey, self.wvalue, self.wout = self.q_proj, self.k_proj, self.v_proj, self.o_proj
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(self, x):
        return self.attend(x, self.wquery, self.wkey, self.wvalue, self.wout)


def test_attention_it_does_not_recognise_is_left_unpruned_with_the_reason_and_the_rest_is_pruned():
    model = TinyLM(4, 2).eval()
    for layer in model.layers:
        layer.self_attn = UnnamedAttention()
    ids = torch.randint(0, 40, (8, 6))
    with pytest.warns(UserWarning, match="would break the model"):
        small, summary = compress(model, ids[:1], 0.5, "fold", ids)
    assert set(summary.skipped_groups) == {"layers.0.self_attn.wvalue", "layers.1.self_attn.wvalue"}
    assert all("invalid for input" in why for why in summary.skipped_groups.values())
    assert summary.channels["layers.0.self_attn.wvalue"] == [16, 16] and summary.channels["layers.0.up_proj"] == [48, 24]
    assert summary.channels["layers.0.self_attn.wout"] == [32, 16]  # the residual width is pruned
    assert torch.isfinite(small(ids)).all()


def test_global_pruning_spreads_the_head_budget_by_each_heads_share_except_under_a_shared_config():
    from torch_pruning_ext.pruner import _global_head_counts
    # fraction lost after each removal: block 0 has one head carrying everything, block 1 four alike
    curves = [[0.001, 0.002, 0.003, 1.0], [0.25, 0.5, 0.75, 1.0]]
    assert _global_head_counts(curves, 0.5) == [3, 1]
    assert _global_head_counts([[0.0, 1.0], [0.5, 1.0]], 0.9) == [1, 1]  # never a block's last head
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    model = vit_tiny(10).eval()
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 24:] *= 1e-3  # block 0 relies on its first head only
    small, _ = compress(model, x[:1], 0.5, "default", x, schedule="global", ignored_layers=["patch_embed"])
    counts = [block.attn.num_heads for block in small.blocks]
    assert counts[0] == 1 and sum(counts) == 8 and min(counts) >= 1
    hf = _hf_llama(4).eval()
    ids = {"input_ids": torch.randint(0, 40, (8, 10))}
    small, _ = compress(hf, {"input_ids": ids["input_ids"][:1]}, 0.5, "default", ids, schedule="global")
    assert [layer.self_attn.q_proj.out_features for layer in small.model.layers] == [16, 16]


class PairsTransport:
    """Merges channel 2c + 1 into channel 2c: a map that moves weights, so double mixing would show."""

    def coupling(self, features, importance, kept):
        plan = torch.zeros(len(features), len(kept), dtype=torch.float64)
        for column, channel in enumerate(kept.tolist()):
            plan[channel, column] = 1.0
            if channel + 1 < len(features) and channel + 1 not in kept.tolist():
                plan[channel + 1, column] = 1.0
        return plan


def test_tied_embeddings_fuse_like_untied_ones():
    """The input embedding (a producer) and a tied output head (a consumer) share one tensor: each
    must be mixed by its own map once, as if they were two tensors."""
    torch.manual_seed(0)
    tied = TinyLM(4, 4).eval()
    tied.lm_head.weight = tied.embed_tokens.weight
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = nn.Parameter(untied.embed_tokens.weight.detach().clone())
    ids = torch.randint(0, 40, (2, 6))
    outputs = []
    for model in (tied, untied):
        pruner = IntraFusionPruner(model, ids[:1], importance=FirstHalf())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner.prune([0], 0.5, PairsTransport(), fusion_rule="function_preserving")
        outputs.append(_run(model, ids))
    assert torch.equal(outputs[0], outputs[1])
    assert tied.lm_head.weight is not tied.embed_tokens.weight


class FirstHalf(tp.importance.Importance):
    """Even channels are important, odd ones are not (so PairsTransport merges each odd into the even before it)."""

    def __call__(self, group):
        n = len(group[0].idxs)
        return torch.tensor([2.0 if c % 2 == 0 else 1.0 for c in range(n)])


def test_tied_embeddings_are_tied_again_after_plain_pruning_and_stay_apart_after_a_merge():
    torch.manual_seed(0)
    base = TinyLM(4, 4).eval()
    base.lm_head.weight = base.embed_tokens.weight
    ids = torch.randint(0, 40, (2, 6))
    for transport, tied in ((None, True), (OptimalTransport(), False)):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            IntraFusionPruner(model, ids[:1]).prune("all", 0.5, transport, fusion_rule="function_preserving")
        assert (model.lm_head.weight is model.embed_tokens.weight) == tied
        assert model.embed_tokens.weight.shape == (40, 16)
        assert torch.isfinite(_run(model, ids)).all()


def test_reconstructing_a_tied_output_head_leaves_the_embedding_alone():
    torch.manual_seed(0)
    model = TinyLM(4, 4).eval()
    model.lm_head.weight = model.embed_tokens.weight
    ids = torch.randint(0, 40, (32, 6))
    small, summary = compress(model, ids[:1], 0.5, "default", ids, ignored_layers=["embed_tokens"])  # width kept
    assert "lm_head" in summary.repaired_layers
    assert torch.equal(small.embed_tokens.weight, model.embed_tokens.weight)
    assert not torch.equal(small.lm_head.weight, model.lm_head.weight)
