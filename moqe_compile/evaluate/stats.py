"""Bootstrap intervals and paired tests for per-sample metrics (numpy; scipy only for McNemar).

Every statistic here is a *mean of a per-sample vector*: a 0/1 top-1 correctness vector,
a per-sample loss (KL to FP, cross-entropy), and so on. Comparisons are *paired*: the two
vectors score the same samples, so the test works on their per-sample difference.

- :func:`bootstrap_means` draws ``n_boot`` resamples of the n samples (with replacement)
  once, from ``seed``, and returns the resampled means of any number of vectors at once.
  Resampling the same indices for every vector keeps all intervals of one report paired
  and reproducible. Vectorized: resample *counts* (bincount of the drawn indices) times the
  data matrix, in chunks of about 4 M drawn indices.
- :func:`bootstrap_ci`: percentile interval of a mean (the 2.5% and 97.5% quantiles of the
  resampled means for ``level = 0.95``).
- :func:`paired_bootstrap`: mean difference ``mean(a - b)``, its percentile interval, and a
  two-sided p-value for H0 "the mean difference is 0" from the null-centred bootstrap
  (Efron & Tibshirani 1993, §16.4): ``p = (1 + #{|d*_b - d| >= |d|}) / (B + 1)``, where d*_b
  are the resampled mean differences and d the observed one. Used for loss- and
  perplexity-style metrics. Identical vectors give d = 0, the interval [0, 0] and p = 1.
- :func:`mcnemar_exact`: for two 0/1 vectors (top-1 correct), the exact McNemar test, i.e. a
  two-sided binomial test of the discordant pairs: with b = #(a right, b wrong) and
  c = #(a wrong, b right), p = P(|X - (b+c)/2| >= |b - (b+c)/2|) for X ~ Bin(b+c, 1/2)
  (= min(1, 2 P(X <= min(b, c)))). No discordant pair gives p = 1.

Clustered samples (augmented views of one source image) are not independent: resampling
them one by one understates the uncertainty. Every function takes optional ``groups`` (one
label per sample) and then resamples whole clusters (the cluster bootstrap); McNemar's test
assumes independent pairs, so :func:`paired_compare` uses the paired-bootstrap p-value for
clustered 0/1 vectors.

Percentile bootstrap intervals of a 0/1 mean are degenerate when every sample agrees
(all right or all wrong: the interval is [v, v]); that is a property of the data, and the
reports print ``n`` next to every interval so a reader can judge.
"""

from __future__ import annotations

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
_CHUNK_ELEMENTS = 4_000_000  # drawn indices per chunk: ~32 MB of int64


def _as_matrix(x) -> tuple[np.ndarray, bool]:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        return a[None, :], True
    if a.ndim != 2:
        raise ValueError(f"expected a vector (n,) or a matrix (m, n) of per-sample values; got shape {a.shape}.")
    return a, False


def group_index(groups) -> np.ndarray:
    """Dense cluster ids 0..G-1 (in order of first appearance) of per-sample group labels."""
    g = np.asarray(groups)
    _, first, inv = np.unique(g, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # relabel by first appearance: deterministic, label-free
    return order[inv.ravel()]


def is_clustered(groups, n: int) -> bool:
    """True when ``groups`` puts some of the n samples together (fewer clusters than samples)."""
    return groups is not None and len(np.unique(np.asarray(groups))) < n


def bootstrap_means(x, n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, groups=None) -> np.ndarray:
    """Means of ``n_boot`` bootstrap resamples of the samples of ``x``.

    ``x`` is (n,) -> returns (n_boot,), or (m, n) (m vectors over the same n samples) ->
    returns (n_boot, m); every vector is resampled with the same indices.

    ``groups`` (n labels, optional): resample whole clusters instead of samples (the cluster
    bootstrap), for samples that are not independent -- e.g. augmented views of one source
    image. Each resample draws G clusters with replacement; its mean is the sum over the
    drawn clusters' samples divided by their number. With every sample its own cluster this
    is the plain bootstrap.
    """
    X, single = _as_matrix(x)
    n = X.shape[1]
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample.")
    if n_boot < 1:
        raise ValueError(f"n_boot = {n_boot} must be >= 1.")
    if groups is not None:
        gi = group_index(groups)
        if gi.shape != (n,):
            raise ValueError(f"groups has {gi.size} labels for {n} samples.")
        G = int(gi.max()) + 1
        sums = np.zeros((G, X.shape[0]))
        np.add.at(sums, gi, X.T)  # per-cluster sums
        sizes = np.bincount(gi, minlength=G).astype(np.float64)
    else:
        G, sums, sizes = n, X.T, np.ones(n)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // G)
    out = np.empty((n_boot, X.shape[0]))
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        idx = rng.integers(0, G, size=(c, G))
        # counts[r, j] = how often unit j was drawn in resample r (row sums are G).
        counts = np.bincount((idx + (np.arange(c) * G)[:, None]).ravel(), minlength=c * G).reshape(c, G)
        counts = counts.astype(np.float64)
        out[start : start + c] = (counts @ sums) / (counts @ sizes)[:, None]
    return out[:, 0] if single else out


def percentile_interval(resampled: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of resampled statistics (axis 0)."""
    if not 0 < level < 1:
        raise ValueError(f"level = {level} must be in (0, 1).")
    lo, hi = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return float(lo), float(hi)


def bootstrap_ci(x, n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                 level: float = 0.95, groups=None) -> tuple[float, tuple[float, float]]:
    """(mean of ``x``, percentile bootstrap interval of the mean; clusters: see bootstrap_means)."""
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"expected a vector of per-sample values; got shape {v.shape}.")
    return float(v.mean()), percentile_interval(bootstrap_means(v, n_boot, seed, groups), level)


def bootstrap_p_value(observed: float, resampled: np.ndarray) -> float:
    """Two-sided null-centred bootstrap p-value of H0 "mean = 0" (see the module docstring)."""
    r = np.asarray(resampled, dtype=np.float64)
    # A tiny tolerance so that float noise in the resampled means of an exactly-zero
    # difference cannot turn p = 1 into p < 1.
    tol = 1e-12 * max(1.0, abs(observed))
    extreme = np.abs(r - observed) >= abs(observed) - tol
    return float((1 + extreme.sum()) / (len(r) + 1))


def paired_bootstrap(a, b, n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                     level: float = 0.95, groups=None) -> dict:
    """Paired bootstrap of ``mean(a) - mean(b)`` over the same samples (clusters: ``groups``).

    Returns ``{"diff", "ci95", "p_value", "test": "paired-bootstrap", "n"}`` (``ci95`` is at
    ``level``, 0.95 unless changed).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired vectors must have the same 1-D shape; got {a.shape} and {b.shape}.")
    d = a - b
    diff = float(d.mean())
    res = bootstrap_means(d, n_boot, seed, groups)
    return {"diff": diff, "ci95": list(percentile_interval(res, level)), "p_value": bootstrap_p_value(diff, res),
            "test": "paired-bootstrap", "n": int(len(d))}


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials under Bin(n, 1/2)."""
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(min(1.0, binomtest(int(k), int(n), 0.5, alternative="two-sided").pvalue))


def mcnemar_exact(a_correct, b_correct) -> dict:
    """Exact McNemar test of two paired 0/1 vectors (e.g. top-1 correct of MoQE and of an expert).

    Returns ``{"p_value", "a_only", "b_only", "test": "mcnemar", "n"}``: ``a_only`` = samples
    only ``a`` gets right, ``b_only`` = samples only ``b`` gets right.
    """
    a, b = np.asarray(a_correct), np.asarray(b_correct)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired vectors must have the same 1-D shape; got {a.shape} and {b.shape}.")
    for name, v in (("a_correct", a), ("b_correct", b)):
        if not np.isin(v, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0/1 (or booleans) for McNemar's test.")
    a, b = a.astype(bool), b.astype(bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    return {"p_value": binomial_two_sided_p(min(a_only, b_only), a_only + b_only),
            "a_only": a_only, "b_only": b_only, "test": "mcnemar", "n": int(len(a))}


def is_binary(x) -> bool:
    v = np.asarray(x)
    return bool(v.size) and bool(np.isin(v, (0, 1)).all())


def paired_compare(a, b, n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = 0.95,
                   groups=None) -> dict:
    """``mean(a) - mean(b)`` with a paired bootstrap interval and the right test: exact McNemar
    for 0/1 vectors of independent samples, the paired-bootstrap p-value otherwise (also for
    0/1 vectors whose samples are clustered by ``groups``: McNemar assumes independent pairs)."""
    out = paired_bootstrap(a, b, n_boot, seed, level, groups)
    if is_binary(a) and is_binary(b) and not is_clustered(groups, len(np.asarray(a))):
        m = mcnemar_exact(a, b)
        out.update(p_value=m["p_value"], test="mcnemar", discordant={"a_only": m["a_only"], "b_only": m["b_only"]})
    return out
