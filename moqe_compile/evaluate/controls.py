"""The controls a MoQE gain is measured against (docs/design.md#controls-and-the-gate).

Task-free, on per-sample vectors (both reports call these):

- :func:`random_route`: the router's own expert mix shuffled across inputs (same usage, no
  input information). A router that does not beat it has learned nothing about the inputs.
- :func:`copies_entries`: the **copies control**, K copies of one recipe calibrated on disjoint
  random subsets of the calibration split. They differ only by calibration noise, so their
  oracle headroom is a lottery, and a router trained on them shows what routing gains from
  noise alone. Copies are scored at build time and stored (``report/controls.npz``); they are
  not shipped as experts.
- :func:`cost_matched` and :func:`frontier_pair`: MoQE against the best random mix of two
  single experts that costs what MoQE costs on average (cost: mean weight bits per weight).

Below them, the stored copies (:class:`Copies`). The copies themselves are built by
:func:`moqe_compile.stages.build_copies`, for both tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


CONTROLS_FILE = "report/controls.npz"


def random_route(route: np.ndarray, seed: int) -> np.ndarray:
    """MoQE's expert choices shuffled across inputs: the random-router control."""
    return np.random.default_rng(seed).permutation(route)


def copies_entries(copies: dict, measure) -> dict:
    """Per-sample vectors of the copies control: ``measure(choice)`` for each copy, for their
    oracle (argmin loss per sample) and, when given, for the router trained on the copies.

    ``copies``: ``{"names", "loss": (N, Kc), "route": (N,) | None, ...}``; ``choice``: (N,)
    index of the copy used per sample. Keys: ``copy:<name>``, ``copies_oracle``,
    ``copies_router``."""
    loss = np.asarray(copies["loss"], np.float64)
    n = len(loss)
    choices = {f"copy:{name}": np.full(n, j) for j, name in enumerate(copies["names"])}
    choices["copies_oracle"] = loss.argmin(1)
    if copies.get("route") is not None:
        choices["copies_router"] = np.asarray(copies["route"]).astype(np.int64)
    return {k: measure(c) for k, c in choices.items()}


def copies_summary(copies: dict, label: str, summary, oracle_gain: dict) -> dict:
    """The report's ``controls.copies_oracle`` block (without the copies router's rows).

    ``label``: the key naming what was copied (``preset`` or ``of``); ``summary(key)``: the
    report entry of a :func:`copies_entries` vector."""
    names = list(copies["names"])
    return {label: copies.get(label), "copies": len(names), "best_copy": names[copies["best"]],
            "best_copy_chosen_on": "val", "copies_metrics": {n: summary(f"copy:{n}") for n in names},
            **summary("copies_oracle"), "oracle_gain": oracle_gain}


def cost_matched(names: list[str], costs: dict | None, route: np.ndarray, val_loss: dict | None = None,
                 split_score: dict | None = None, split: str = "test", unit: str = "mean weight bits",
                 unit_name: str = "cost") -> dict:
    """MoQE against single experts at its expected cost: the best random mix of an expert at
    or below that cost and one at or above it (:func:`frontier_pair`).

    "Best" is by mean validation loss (``val_loss``, from the build) so nothing is selected on
    the split being reported; without it by ``split_score`` (higher is better) on ``split``,
    and the result says so; without either the control is not applicable. When applicable,
    :func:`interpolate` gives the matched per-sample vector."""
    if not costs or any(n not in costs for n in names):
        return {"applicable": False, "reason": "expert costs unknown"}
    c = np.array([float(costs[n]) for n in names])
    usage = np.bincount(route, minlength=len(names)) / len(route)
    expected = float(usage @ c)
    base = {"cost": unit, "expert_costs": {n: float(v) for n, v in zip(names, c)}, "moqe_expected_cost": expected}
    if np.ptp(c) == 0:
        return {"applicable": False, **base, "reason": f"every expert has the same {unit_name}: the best single "
                                                        "expert is the cost-matched comparison"}
    if val_loss and all(n in val_loss for n in names):
        score, chosen_on = {n: -float(val_loss[n]) for n in names}, "val"
    elif split_score is not None:
        score, chosen_on = split_score, split
    else:
        return {"applicable": False, **base, "reason": "no validation losses to choose the bracketing experts on"}
    # Never None here: the expected cost is a mix of the experts' costs, so the cheapest and the
    # costliest expert bracket it.
    lo, hi, wl = frontier_pair(names, c, expected, score)
    return {"applicable": True, **base, "cheaper": lo, "costlier": hi, "weight_cheaper": float(wl),
            "chosen_on": chosen_on}


def interpolate(cm: dict, vector) -> np.ndarray:
    """The per-sample vector of an applicable :func:`cost_matched` mix; ``vector(name)`` is
    one expert's."""
    wl = cm["weight_cheaper"]
    return wl * vector(cm["cheaper"]) + (1 - wl) * vector(cm["costlier"])


def frontier_pair(names: list[str], costs, expected: float, score: dict) -> tuple[str, str, float] | None:
    """The random mix of two single experts that costs ``expected`` on average and scores best:
    over every pair (cheaper <= expected <= costlier), the one whose linear interpolation of
    ``score`` at ``expected`` is highest -> (cheaper, costlier, weight of the cheaper).

    Not "the best expert on each side": that skips an expert that costs a hair more than MoQE
    and is as good as MoQE, and so flatters a router that mostly serves that expert."""
    c = [float(v) for v in costs]
    best = None
    for i, lo in enumerate(names):
        for j, hi in enumerate(names):
            if not (c[i] <= expected + 1e-9 and c[j] >= expected - 1e-9):
                continue
            wl = 1.0 if c[j] == c[i] else min(1.0, max(0.0, (c[j] - expected) / (c[j] - c[i])))
            v = wl * score[lo] + (1 - wl) * score[hi]
            if best is None or v > best[0]:
                best = (v, lo, hi, wl)
    return None if best is None else best[1:]



@dataclass
class Copies:
    names: list[str]
    preset: str  # what was copied: the expert's name, or the preset when no expert had one
    best: int  # chosen on router_val (lowest mean loss)
    calibration_per_copy: int
    splits: dict  # split -> {"loss": (N, Kc), "pred": (N, Kc), "route": (N,) | None}

    def for_split(self, split: str) -> dict:
        return {"names": self.names, "preset": self.preset, "best": self.best, **self.splits[split]}

    def save(self, path: Path) -> None:
        arrays = {"names": np.array(self.names), "preset": np.array(self.preset), "best": np.array(self.best),
                  "calibration_per_copy": np.array(self.calibration_per_copy)}
        for s, d in self.splits.items():
            arrays[f"{s}_loss"], arrays[f"{s}_pred"] = d["loss"], d["pred"]
            if d.get("route") is not None:
                arrays[f"{s}_route"] = d["route"]
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> "Copies":
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            splits = {}
            for key in z.files:
                if key.endswith("_loss"):
                    s = key[: -len("_loss")]
                    splits[s] = {"loss": z[key], "pred": z[f"{s}_pred"],
                                 "route": z[f"{s}_route"] if f"{s}_route" in z.files else None}
            return cls(names, str(z["preset"]), int(z["best"]), int(z["calibration_per_copy"]), splits)


