"""Latency of a bundle on its runtime backend (ONNX Runtime CPU): router alone, each expert
alone, FP32 and the whole MoQE path (route + grouped dispatch), side by side.

All candidates run interleaved in one process on the same inputs, round by round, so drift
(thermal, other load) hits all alike; after one warm-up call each, ``repeats`` rounds give
the median and the interquartile range per candidate. Ratios (INT8/FP32, router/expert,
MoQE/expert) are taken from the medians. Used by ``moqe-compile eval`` and
``bench/latency.py``.
"""

from __future__ import annotations

import platform
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
    return {"median_ms": round(statistics.median(xs), 3), "iqr_ms": [round(q[0], 3), round(q[2], 3)]}


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


def measure_bundle(rt, pool: np.ndarray, batches=(1, 32), repeats: int = 30, fp_session=None) -> dict:
    """Latency of ``rt`` (a :class:`moqe_compile.Runtime`) on batches tiled from ``pool``.

    Candidates: ``router`` (when routing is enabled), ``fp32`` (when ``fp_session`` is
    given), ``expert:<name>`` for each expert and ``moqe`` (``rt.run``: route + dispatch).
    """
    router = rt.router_session
    results = {"cpu": platform.processor() or platform.machine(), "backend": rt.backend, "repeats": int(repeats),
               "batches": {}}
    for bs in batches:
        x = tile_batch(pool, bs)
        cands: dict[str, Callable[[], object]] = {}
        if router is not None:
            cands["router"] = lambda: router.run(x)
        if fp_session is not None:
            cands["fp32"] = lambda: fp_session.run(x)
        for name in rt.expert_names:
            cands[f"expert:{name}"] = (lambda n=name: rt.run_expert(n, x))
        cands["moqe"] = lambda: rt.run(x)
        row: dict = time_interleaved(cands, repeats)
        med = {k: v["median_ms"] for k, v in row.items()}
        experts = [med[f"expert:{n}"] for n in rt.expert_names]
        mean_expert = statistics.mean(experts)
        ratios: dict = {}
        if "fp32" in med:
            ratios["int8_over_fp32"] = {n: round(med[f"expert:{n}"] / med["fp32"], 3) for n in rt.expert_names}
        if "router" in med:
            ratios["router_over_mean_expert"] = round(med["router"] / mean_expert, 3)
        ratios["moqe_over_mean_expert"] = round(med["moqe"] / mean_expert, 3)
        row["ratios"] = ratios
        row["experts_used"] = sorted(set(rt.run(x).experts))
        results["batches"][str(bs)] = row
    return results


def format_batch(bs: int | str, row: dict) -> str:
    """The text ``bench/latency.py`` prints for one batch size."""
    import json

    L = [f"batch {bs}:"]
    for k, v in row.items():
        if k not in ("ratios", "experts_used"):
            L.append(f"  {k:<22} median {v['median_ms']:9.3f} ms   IQR {v['iqr_ms']}")
    L.append(f"  ratios {json.dumps(row['ratios'])}  experts used {row['experts_used']}")
    return "\n".join(L)
