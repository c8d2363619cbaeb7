#!/usr/bin/env python
"""Whole-network pruning of Hugging Face transformers nobody here wrote: docs/TRANSFORMER_ZOO.md and its CSV.

Each family is built from a small config with random weights (no download), LayerNorm scales and
shifts randomised as a trained model has them, and pruned whole at --sparsity (attention heads at the
same fraction) with default pruning and with Intra-Fusion (function-preserving rule). Every pruned
model must run and give finite outputs of the original's shape; the head slicing is verified against
the original with those heads' output columns zeroed before anything changes (attention.check_heads).
"""
from __future__ import annotations

import copy
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from torch_pruning_ext import IntraFusionPruner, OptimalTransport  # noqa: E402
from zoo import zoo_main  # noqa: E402

VOCAB, WIDTH, LAYERS, HEADS, FFN = 64, 32, 2, 4, 64
COMMON = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              max_position_embeddings=32)
# family -> (config class, model class, config arguments, what its attention looks like)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                                    n_positions=32), "fused c_attn (Conv1D)"),
    "bert": ("BertConfig", "BertForSequenceClassification", COMMON | dict(intermediate_size=FFN),
             "query/key/value, output.dense beside it"),
    "opt": ("OPTConfig", "OPTForCausalLM", COMMON | dict(ffn_dim=FFN, word_embed_proj_dim=WIDTH), "q/k/v/out_proj"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON | dict(intermediate_size=FFN, num_key_value_heads=HEADS),
              "q/k/v/o_proj, rotary"),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", COMMON | dict(intermediate_size=FFN, num_key_value_heads=2),
                  "grouped-query, 2 key-value heads"),
    "llama_mqa": ("LlamaConfig", "LlamaForCausalLM", COMMON | dict(intermediate_size=FFN, num_key_value_heads=1),
                  "multi-query, 1 key-value head"),
    "mistral": ("MistralConfig", "MistralForCausalLM", COMMON | dict(intermediate_size=FFN, num_key_value_heads=2,
                                                                     head_dim=8), "grouped-query"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", COMMON | dict(intermediate_size=FFN, num_key_value_heads=2),
              "grouped-query, q/k/v biases"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", COMMON | dict(intermediate_size=FFN, num_key_value_heads=2,
                                                               head_dim=8), "grouped-query, tied embeddings"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", COMMON | dict(intermediate_size=FFN, num_key_value_heads=2,
                                                            pad_token_id=0), "fused qkv_proj, fused gate_up_proj"),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(image_size=32, patch_size=8, hidden_size=WIDTH,
                                                           num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                           intermediate_size=FFN, num_labels=10),
            "query/key/value, output.dense beside it"),
}
FIELDS = ["model", "attention", "sparsity", "method", "channel_groups", "head_groups", "fused", "heads", "skipped",
          "fallbacks", "params_before", "params_after", "output_ok", "seconds"]


def build(name: str, seed: int = 0) -> torch.nn.Module:
    import transformers
    config_class, model_class, arguments, _ = FAMILIES[name]
    config = getattr(transformers, config_class)(**arguments)
    config.use_cache = False
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model


def example_inputs(name: str, count: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(count, 3, 32, 32, generator=generator)}
    return {"input_ids": torch.randint(1, VOCAB, (count, 10), generator=generator)}


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def run_family(name: str, sparsity: float, methods=("default", "intra_fusion_fp")) -> list[dict]:
    base = build(name)
    inputs = example_inputs(name)
    expected = outputs(base, inputs).shape
    rows = []
    for method in methods:
        model = copy.deepcopy(base)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = IntraFusionPruner(model, {key: value[:1] for key, value in inputs.items()})
            results = pruner.prune("all", sparsity, OptimalTransport() if method != "default" else None,
                                   fusion_rule="function_preserving")
        seconds = time.perf_counter() - started
        out = outputs(model, inputs)
        heads = [r for r in results if r.group >= len(pruner.roots)]
        reasons = Counter(r.fallback_reason.split(": ", 1)[0 if r in heads else -1] for r in results if r.fallback_reason)
        rows.append({"model": name, "attention": FAMILIES[name][3], "sparsity": sparsity, "method": method,
                     "channel_groups": len(results) - len(heads), "head_groups": len(heads),
                     "fused": sum(r.fused for r in results),
                     "heads": " ".join(f"{r.channels - len(r.pruned)}/{r.channels}" for r in heads),
                     "skipped": "; ".join(f"{pruner.root_name(r.group)}: {r.skipped_reason}"
                                          for r in results if r.skipped_reason),
                     "fallbacks": "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items())),
                     "params_before": sum(p.numel() for p in base.parameters()),
                     "params_after": sum(p.numel() for p in model.parameters()),
                     "output_ok": bool(out.shape == expected and torch.isfinite(out).all()),
                     "seconds": round(seconds, 2)})
    return rows


def page(rows: list[dict], command: str) -> str:
    lines = ["# Hugging Face transformers", "",
             f"Small configs of each family ({LAYERS} layers, width {WIDTH}, {HEADS} heads), random weights, "
             f"randomised LayerNorms, the whole network pruned at sparsity {rows[0]['sparsity']} (MLP neurons, the "
             "residual width through every norm and embedding, and the same fraction of each attention block's "
             "heads) with the function-preserving rule. heads: kept/prunable units per attention block (a unit is "
             "a key-value group under grouped-query attention). A group that would break the model is left "
             "unpruned (skipped, with the reason); attention heads are pruned whole and never merged unless "
             "identical to a kept head; GPT-2's Conv1D layers are replaced by equal nn.Linear layers first. "
             "A tied input embedding and output head (gpt2, opt, gemma) stay tied after plain pruning; a merge "
             "mixes them by different maps, so after it they are two tensors (the parameter counts differ by one "
             "embedding). "
             "Seconds: graph trace, checks, pruning and fusion on 2 CPU cores.", "",
             f"Regenerate: `{command}`", "",
             "| model | attention | method | channel groups | head groups | fused | heads | params before | after "
             "| output | s | left unpruned | pruned without fusion |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---|---:|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['attention']} | {row['method']} | {row['channel_groups']} | "
                     f"{row['head_groups']} | {row['fused']} | {row['heads']} | {int(row['params_before']):,} | "
                     f"{int(row['params_after']):,} | {'ok' if str(row['output_ok']) == 'True' else 'BROKEN'} | "
                     f"{row['seconds']} | {row['skipped'] or '-'} | {row['fallbacks'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return zoo_main(argv, "transformer_zoo.py", __doc__, FAMILIES, run_family, FIELDS, page,
                    "docs/results/transformer_zoo.csv", "docs/TRANSFORMER_ZOO.md")


if __name__ == "__main__":
    sys.exit(main())
