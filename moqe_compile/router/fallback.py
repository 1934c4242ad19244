"""Confidence fallback: inputs the router is unsure about go to the best single expert.

After training, :func:`choose_fallback` picks on the *validation* split the threshold t
(from the grid 0, every validation max-probability, 1) that minimizes the validation routed
loss when inputs whose router confidence (max probability) is below t are served by the
best single expert (lowest mean validation loss). Ties go to the smallest t (the least
change to the router). t = 0 means no fallback. The Runtime applies the same rule with
:func:`apply_fallback`; numpy only, so the runtime stays free of torch.
"""

from __future__ import annotations

import numpy as np


def apply_fallback(probs: np.ndarray, threshold: float, expert: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) router probabilities -> (expert index, router confidence) per sample.

    The confidence is always the router's max probability, also where the input fell back."""
    idx = probs.argmax(-1)
    conf = probs[np.arange(len(idx)), idx]
    if threshold > 0:
        idx = np.where(conf < threshold, expert, idx)
    return idx, conf


def choose_fallback(probs: np.ndarray, loss: np.ndarray) -> dict:
    """Pick the threshold on validation probabilities ``probs`` (N, K) and losses ``loss`` (N, K)."""
    probs, loss = np.asarray(probs, np.float64), np.asarray(loss, np.float64)
    n = len(loss)
    best = int(loss.mean(0).argmin())
    route = probs.argmax(1)
    conf = probs[np.arange(n), route]
    routed, single = loss[np.arange(n), route], loss[:, best]
    order = np.argsort(conf, kind="stable")
    gain = np.concatenate([[0.0], np.cumsum(single[order] - routed[order])])  # gain[m]: the m least confident fall back
    grid = np.unique(np.concatenate([[0.0], conf, [1.0]]))
    m = np.searchsorted(conf[order], grid, side="left")  # how many have conf < t
    total = (routed.sum() + gain[m]) / n
    j = int(np.flatnonzero(total <= total.min() + 1e-12)[0])
    t = float(grid[j])
    return {"threshold": t, "expert": best, "val_routed_loss": float(routed.mean()),
            "val_loss_with_fallback": float(total[j]), "val_fallback_share": float(m[j] / n)}
