"""Grouped-query attention without repeated keys/values: the same outputs as transformers' eager
attention, with padding and on a decode step, on dense and MoE families it is chosen for
(Mistral with a sliding window shorter than the sequence)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)


def _dense(family):
    from transformers import MistralConfig, Qwen3Config

    common = dict(vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "mistral":
        return MistralConfig(sliding_window=4, **common)
    return Qwen3Config(head_dim=32, **common)  # q/k norms inside the attention module


def _model(config):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "mixtral", "qwen2_moe", "olmoe"])
def test_grouped_attention_equals_eager(family):
    import torch

    from moqe_compile.tasks.causal_lm.attention import NAME, attention_for

    from ...models import tiny_moe_config

    config = _llama() if family == "llama" else _dense(family) if family in ("mistral", "qwen3") \
        else tiny_moe_config(family)
    model = _model(config)
    assert attention_for(model.config.model_type) == NAME
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: fully masked query rows too
    nxt = torch.tensor([[5], [7]])
    out = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            first = model(ids, attention_mask=mask, use_cache=True)
            step = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                         past_key_values=first.past_key_values, use_cache=True)
        out[impl] = (first.logits, step.logits)
    for a, b in zip(out["eager"], out[NAME]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_other_families_keep_eager_attention():
    from moqe_compile.tasks.causal_lm.attention import attention_for

    assert attention_for("gemma2") == "eager"  # soft-capping lives in its own attention function
