"""The language router (``docs/design.md#routers``): routes a whole token sequence to one expert.

    ids (B, T) --frozen FP embedding--> (B, T, d)
        --2 x pre-LN transformer encoder layer (4 heads, feed-forward 2d, GELU, dropout 0.1)-->
        --self-attention refinement block (pre-LN, learnable temperature)-->
        --mean over non-pad tokens--> (B, d) --MLP d -> d/2 -> K--> logits

The embedding table is the FP model's (passed in as a tensor, never trained): the language
experts keep their embeddings in FP, so router and experts read the same vectors. The
exported ONNX graph carries its own copy of the table, so it is self-contained; for a large
vocabulary (SmolLM2-135M: 49152 x 576 floats = 113 MB) that copy dominates its size.

ONNX interface: inputs ``input_ids`` (int64, [batch, sequence]) and ``attention_mask``
(int64, [batch, sequence], 1 = token, 0 = padding, as Hugging Face tokenizers return),
output ``expert_probs`` ([batch, K]); batch and sequence stay symbolic (checked on export).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moqe_compile.errors import BuildError
from moqe_compile.onnx_export import check, check_symbolic, export
from moqe_compile.router.train import FitResult, fit, make_targets, predict

INPUT_IDS, ATTENTION_MASK, OUTPUT_NAME = "input_ids", "attention_mask", "expert_probs"
NEG = -1e4  # additive attention bias on padding keys (finite: no NaN when a row is all padding)


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over (B, T, d) with an additive key-padding bias (B, 1, 1, T).

    ``learn_temperature``: the logit scale is a learned temperature (init 1/sqrt(head_dim)),
    as in the CV router; otherwise the fixed 1/sqrt(head_dim)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, learn_temperature: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model width {dim} is not divisible by heads = {heads}.")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        log_tau = torch.tensor(math.log(1.0 / math.sqrt(self.head_dim)))
        self.log_tau = nn.Parameter(log_tau) if learn_temperature else None
        if self.log_tau is None:
            self.register_buffer("fixed_log_tau", log_tau, persistent=False)

    def forward(self, x, bias):  # x: (B, T, d), bias: (B, 1, 1, T)
        B, T, d = x.shape
        H, D = self.heads, self.head_dim
        q, k, v = self.qkv(x).reshape(B, T, 3 * H, D).transpose(1, 2).split(H, dim=1)  # (B, H, T, D) each
        scale = (self.log_tau if self.log_tau is not None else self.fixed_log_tau).exp()
        att = torch.softmax((q @ k.transpose(-2, -1)) * scale + bias, dim=-1)  # (B, H, T, T)
        y = (self.drop(att) @ v).transpose(1, 2).reshape(B, T, d)
        return self.proj(y)


class PreLNEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int = 2, dropout: float = 0.1):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MaskedSelfAttention(dim, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, bias):
        x = x + self.drop(self.attn(self.ln1(x), bias))
        return x + self.drop(self.ff(self.ln2(x)))


class NLPRouter(nn.Module):
    """``forward(input_ids, attention_mask) -> logits`` (B, K); ``probs`` for the exported form."""

    def __init__(self, embedding: torch.Tensor, num_experts: int, layers: int = 2, heads: int = 4,
                 ff_mult: int = 2, dropout: float = 0.1):
        super().__init__()
        if embedding.ndim != 2:
            raise ValueError(f"embedding table must be (vocab, d), got shape {tuple(embedding.shape)}.")
        d = embedding.shape[1]
        # Frozen: a buffer, so no optimizer ever sees it; saved with the router.
        self.register_buffer("embedding", embedding.detach().float().clone())
        self.encoder = nn.ModuleList(PreLNEncoderLayer(d, heads, ff_mult, dropout) for _ in range(layers))
        self.refine_norm = nn.LayerNorm(d)
        self.refine = MaskedSelfAttention(d, heads, dropout, learn_temperature=True)
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, num_experts))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = F.embedding(input_ids, self.embedding)  # (B, T, d)
        m = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(x.dtype)  # (B, T)
        bias = ((1.0 - m) * NEG)[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.encoder:
            x = layer(x, bias)
        x = x + self.refine(self.refine_norm(x), bias)
        x = self.final_norm(x)
        pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)  # mean over tokens
        return self.head(pooled)


class _Exported(nn.Module):
    def __init__(self, router: NLPRouter):
        super().__init__()
        self.router = router

    def forward(self, input_ids, attention_mask):
        return torch.softmax(self.router(input_ids, attention_mask), dim=-1)


def predict_probs(router: NLPRouter, ids: np.ndarray, mask: np.ndarray, batch: int = 128) -> np.ndarray:
    """Router probabilities (N, K) for token windows ``ids`` with attention ``mask``."""
    return predict(router, (torch.from_numpy(ids), torch.from_numpy(mask)), batch)


def train_router(router: NLPRouter, ids: np.ndarray, mask: np.ndarray, loss: np.ndarray,
                 val_ids: np.ndarray, val_mask: np.ndarray, val_loss: np.ndarray, *, epochs: int = 10,
                 batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-4, targets: str = "hard",
                 temperature: float = 0.1, seed: int = 0, threads: int | None = None) -> FitResult:
    """Train ``router`` on per-sequence targets from the (N, K) loss matrix (``hard``, or
    ``soft``/``fp-teacher`` = softmax(-M/T)) with the one training loop (``router/train.py``)."""
    y = make_targets(loss, "hard" if targets == "hard" else "soft", temperature)
    return fit(router, (torch.from_numpy(ids), torch.from_numpy(mask)), y,
               (torch.from_numpy(val_ids), torch.from_numpy(val_mask)), val_loss, epochs=epochs,
               batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, predict_batch=128,
               threads=threads)


def export_nlp_router(router: NLPRouter, onnx_path: Path, opset: int = 18, atol: float = 1e-4) -> None:
    """ONNX with symbolic batch and sequence dims (checked), outputs checked against torch on
    padded batches of two different shapes (``onnx_export``)."""
    if opset < 17:
        raise BuildError(f"NLP router ONNX export needs opset >= 17 (LayerNormalization), got {opset}.")
    model = _Exported(router).eval()
    vocab = router.embedding.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=1, max=8192)
    export(model, (ids, mask), onnx_path, input_names=[INPUT_IDS, ATTENTION_MASK], output_names=[OUTPUT_NAME],
           dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), opset=opset, what="NLP router")
    check_symbolic(onnx_path, {INPUT_IDS: [0, 1], ATTENTION_MASK: [0, 1], OUTPUT_NAME: [0]}, "NLP router")
    check(model, onnx_path, [_padded_example(vocab, b, t, g) for b, t in ((3, 7), (1, 13))], what="NLP router",
          atol=atol, rtol=1e-5)


def _padded_example(vocab: int, batch: int, seq: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, seq // 2 :] = 0  # a padded row
    return ids, mask


def choose_prefix(val_loss: dict[int, np.ndarray], level: float = 0.95) -> tuple[int, dict]:
    """The prefix length to route on, from ``val_loss`` = {length: per-window loss of the windows
    routed by that length's router} on router_val: the lowest mean, unless a shorter prefix is not
    significantly worse (its paired bootstrap interval against the lowest includes 0); then the
    shortest such, since the router's cost grows with its prefix. Returns (length, the record of
    every length's mean and difference for the report)."""
    from moqe_compile.evaluate.stats import paired_bootstrap

    lengths = sorted(val_loss)
    best = min(lengths, key=lambda n: (float(np.mean(val_loss[n])), n))
    rows = {}
    for n in lengths:
        d = paired_bootstrap(val_loss[n], val_loss[best], level=level)
        rows[str(n)] = {"val_loss": float(np.mean(val_loss[n])), "vs_lowest": d,
                        "not_worse": bool(d["ci95"][0] <= 0.0)}
    chosen = next(n for n in lengths if rows[str(n)]["not_worse"])
    return chosen, {"lowest": best, "chosen": chosen, "rule": "shortest prefix whose router_val loss is not "
                    "significantly above the lowest one's (paired bootstrap 95% interval includes 0)",
                    "lengths": rows}
