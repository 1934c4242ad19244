"""Interleaved latency: candidates (router alone, each expert alone, FP32, the whole MoQE
path) timed side by side in one process on the same inputs.

Candidates run round by round, so drift (thermal, other load) hits all alike; after one
warm-up call each, ``repeats`` rounds give the median and the interquartile range per
candidate. Each task's ``eval`` chooses the candidates (the image one:
``moqe_compile.tasks.image.eval.measure_bundle``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def tile_batch(x: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` samples of ``x`` repeated as often as needed, contiguous."""
    if len(x) == 0:
        raise ValueError("no samples to build a latency batch from.")
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n])


def summarize(xs: list[float]) -> dict:
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4)
    else:
        q = [xs[0], xs[0], xs[0]]
    # min_ms: the least-disturbed round, for machines shared with other jobs
    return {"median_ms": round(statistics.median(xs), 3), "iqr_ms": [round(q[0], 3), round(q[2], 3)],
            "min_ms": round(min(xs), 3)}


def time_interleaved(cands: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Median/IQR (ms) per candidate, timed round by round after one warm-up call each."""
    if repeats < 1:
        raise ValueError(f"repeats = {repeats} must be >= 1.")
    samples: dict[str, list[float]] = {k: [] for k in cands}
    for f in cands.values():  # warm-up: arenas, kernel selection
        f()
    for _ in range(repeats):
        for k, f in cands.items():
            t = time.perf_counter()
            f()
            samples[k].append((time.perf_counter() - t) * 1e3)
    return {k: summarize(v) for k, v in samples.items()}


def format_batch(bs: int | str, row: dict) -> str:
    """The text ``bench/latency.py`` prints for one batch size."""
    import json

    L = [f"batch {bs}:"]
    for k, v in row.items():
        if k not in ("ratios", "experts_used"):
            L.append(f"  {k:<22} median {v['median_ms']:9.3f} ms   IQR {v['iqr_ms']}")
    L.append(f"  ratios {json.dumps(row['ratios'])}  experts used {row['experts_used']}")
    return "\n".join(L)
