"""Per-sample losses of one model's outputs against a reference: what fills the loss matrix
``L[i, k]`` of every task (see docs/design.md#the-loss-matrix)."""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray, dtype=np.float64, scratch: np.ndarray | None = None) -> np.ndarray:
    """Log-probabilities over the last axis, computed in ``dtype`` (``None``: the input's own
    dtype, for vocabulary-sized logits where float64 would cost as much as the forward pass).
    ``scratch``: a buffer of ``z``'s shape and dtype (with ``dtype = None``); ``z`` is then
    overwritten with the result, by the same arithmetic (bit-identical) without the three
    vocabulary-sized temporaries, whose allocation and page faults cost more than the math
    on 2 cores (LM scoring)."""
    if scratch is None:
        if dtype is not None:
            z = z.astype(dtype)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=scratch)
    z -= np.log(scratch.sum(axis=-1, keepdims=True))
    return z


def sample_losses(logits: np.ndarray, fp_logits: np.ndarray, labels: np.ndarray | None, targets: str) -> np.ndarray:
    """Per-sample cross-entropy of ``labels`` (``targets = "labels"``), else KL(p_fp || p)."""
    lp = log_softmax(logits)
    if targets == "labels":
        return -lp[np.arange(len(lp)), labels]
    lq = log_softmax(fp_logits)
    return (np.exp(lq) * (lq - lp)).sum(axis=-1)


def kl_to_fp(logits: np.ndarray, fp_logits: np.ndarray) -> np.ndarray:
    """Per-sample KL(p_fp || p): how far a quantized model's output moved from FP's."""
    return sample_losses(logits, fp_logits, None, "fp")
