"""Group a routed batch per expert and put the experts' outputs back in input order.

numpy only and no package imports: the Triton BLS model (``moqe-compile export-triton``)
and the Ray Serve ingress run this very file, so every deployment groups exactly as
``Runtime.run`` does.
"""

from __future__ import annotations

import numpy as np


def group_by_expert(idx: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(expert, sample indices) for each expert chosen at least once, experts ascending,
    samples in input order: one batch per expert."""
    idx = np.asarray(idx)
    return [(int(k), np.flatnonzero(idx == k)) for k in np.unique(idx)]


def scatter(groups: list[tuple[int, np.ndarray]], outputs: list[np.ndarray], n: int) -> np.ndarray:
    """Each group's expert outputs back to their samples' positions: (n, ...) in input order."""
    if len(groups) != len(outputs) or not outputs:
        raise ValueError(f"{len(groups)} groups but {len(outputs)} outputs.")
    first = np.asarray(outputs[0])
    out = np.empty((n, *first.shape[1:]), first.dtype)
    for (_, members), y in zip(groups, outputs):
        y = np.asarray(y)
        if len(y) != len(members):
            raise ValueError(f"an expert returned {len(y)} rows for {len(members)} samples.")
        out[members] = y
    return out


def split_requests(sizes: list[int]) -> list[slice]:
    """Slices of a merged batch, one per request of ``sizes`` samples, in order."""
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]
