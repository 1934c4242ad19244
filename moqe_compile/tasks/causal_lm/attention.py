"""Grouped-query attention for export, without repeating keys and values per query head.

transformers' eager attention (``repeat_kv``) expands each key/value head to the query heads
that share it before the two matrix products. Exported, that is an ``Expand`` copy of the whole
KV cache per layer and per decoded token, which grows with the context: on SmolLM2-135M (9
query heads on 3 KV heads) decoding at a 1024-token context is 1.5x faster without it
(docs/results.md#grouped-attention). Here the query heads of one KV head are stacked along the
rows instead, so each KV head is read once, by a batched MatMul with ``groups x tokens`` rows:
the same result as eager attention within float rounding (the products have other shapes).

Registered with transformers' ``AttentionInterface`` (its supported way to plug in an attention
function) as ``moqe-grouped``; :func:`attention_for` chooses it for the model families whose
attention calls the function with nothing beyond a mask and a scale, and transformers' eager
attention for every other model.
"""

from __future__ import annotations

NAME = "moqe-grouped"
# Families whose attention module hands the attention function only (query, key, value, mask,
# scaling, dropout) - no soft-capping, no attention sinks, no sliding window in the function.
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mixtral", "olmoe"})


def grouped_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """(attention output [batch, tokens, heads, head_dim], weights [batch, heads, tokens, keys]).

    ``query`` [batch, heads, tokens, head_dim]; ``key``/``value`` [batch, kv_heads, keys, head_dim];
    ``attention_mask``: additive, [batch, 1 or heads, tokens, keys], or None."""
    import torch

    b, heads, t, d = query.shape
    kv = key.shape[1]
    groups = heads // kv
    # query head kv * groups + j reads KV head kv (repeat_kv's order): stack each KV head's groups as rows
    q = query.reshape(b, kv, groups * t, d)
    w = torch.matmul(q, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        per_head = attention_mask.shape[1] != 1
        mask = attention_mask.reshape(b, kv, groups, t, -1) if per_head else attention_mask[:, :, None]
        w = (w.reshape(b, kv, groups, t, -1) + mask).reshape(b, kv, groups * t, -1)
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).reshape(b, heads, t, d)
    return out.transpose(1, 2).contiguous(), w.reshape(b, heads, t, -1)


def attention_for(model_type: str) -> str:
    """The ``attn_implementation`` to load a model of ``model_type`` with (registers ours once)."""
    if model_type not in FAMILIES:
        return "eager"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_attention)
    # The mask as eager attention takes it (additive floats); an attention function without a
    # mask function of its own would be handed SDPA's boolean mask.
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME
