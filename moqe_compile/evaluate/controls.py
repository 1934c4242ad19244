"""Build-time controls (issue 10, DESIGN.md section 8): what a MoQE gain must be measured against.

- **Copies control**: K copies of the strongest expert's recipe, each calibrated on a disjoint
  random subset of the calibration split. They differ only by calibration noise, so their
  oracle headroom is a lottery, and a router trained on them (same architecture, targets and
  fallback as the bundle's router) shows what routing gains from noise alone. The copies are
  scored at build time and stored as per-sample losses and predicted classes
  (``report/controls.npz``); they are not shipped as experts.
- **Expert cost**: mean weight bits per weight parameter (layers kept in FP count 32), the
  cost unit of ``controls.cost_matched``.
- **Significance gate**: :func:`gate_decision` turns the router_val report into the
  manifest's ``router.gate``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from moqe_compile.tasks.image.config import BuildConfig, ExpertRecipe
from moqe_compile.tasks.image.presets import STRONGEST_PRESETS
from moqe_compile.quantize.graph import weight_layers

CONTROLS_FILE = "report/controls.npz"


def strongest_expert(experts: list[ExpertRecipe]) -> str | None:
    """The first expert built from a strongest preset (the baseline every report measures)."""
    return next((r.name for r in experts if r.preset in STRONGEST_PRESETS), None)


def copy_recipe(cfg: BuildConfig) -> ExpertRecipe:
    """The recipe the copies repeat: ``[controls] copies_of``'s, else the strongest expert's,
    else the ``strongest`` preset at the first expert's weight width."""
    name = cfg.controls.copies_of or strongest_expert(cfg.experts)
    if name is not None:
        return next(r for r in cfg.experts if r.name == name)
    preset = "w4a8-strongest" if cfg.experts[0].weight_bits == 4 else "strongest"
    return ExpertRecipe.from_preset("copy", preset)


def expert_cost(prepared: Path, excluded: list[str], weight_bits: int, high_precision: list[str] = ()) -> float:
    """Mean weight bits per Conv/Gemm weight parameter; FP-kept layers count 32, layers kept
    at 8 bits (``high_precision``) 8."""
    m = onnx.load(str(prepared))
    sizes = {i.name: int(np.prod(i.dims)) for i in m.graph.initializer}
    total = bits = 0
    for l in weight_layers(m):
        n = sizes[l.weight]
        total += n
        bits += n * (32 if l.node in excluded else 8 if l.node in high_precision else weight_bits)
    return float(bits / total) if total else float(weight_bits)


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


def gate_decision(val_report: dict, alpha: float, force: bool) -> dict:
    """``router.gate`` from the router_val split report.

    Routing is kept only if MoQE beats the best single expert (chosen on val) with a paired
    p-value below ``alpha`` *and* its gain exceeds the copies router's gain over the best copy
    (what routing gains from calibration noise alone; when there is no copies router, the
    copies oracle's headroom, a stricter bar). Without a copies control only the first test
    applies, and the reason says so. Both are measured on router_val, which also chose the
    router's epoch and fallback: optimistic for MoQE, so a refusal is conservative.
    """
    vb = val_report["moqe_vs_best"]
    gain, p = float(vb["diff"]), float(vb["p_value"])
    co = (val_report.get("controls") or {}).get("copies_oracle")
    copies_gain, copies_kind = None, None
    if co:
        if co.get("router"):
            best_copy = co["copies_metrics"][co["best_copy"]][vb["metric"]]["value"]
            copies_gain, copies_kind = co["router"][vb["metric"]]["value"] - best_copy, "copies router"
        else:
            copies_gain, copies_kind = co["oracle_gain"]["diff"], "copies oracle headroom"
    metric = vb["metric"]
    fmt = lambda v: f"{100 * v:+.2f} points" if metric in ("top1", "fp_top1_agreement") else f"{v:+.4g}"  # noqa: E731
    reasons = []
    if not (p < alpha):
        reasons.append(f"paired test vs {val_report['best_expert']['name']}: p = {p:.3g} >= {alpha}")
    if not gain > 0:
        reasons.append(f"no gain over {val_report['best_expert']['name']} ({fmt(gain)})")
    if copies_gain is not None and not gain > copies_gain:
        reasons.append(f"gain {fmt(gain)} does not exceed the {copies_kind}'s {fmt(copies_gain)}")
    # The best single expert is chosen by loss (what the bundle serves when routing is refused);
    # MoQE must also beat the single expert that is best on the headline metric itself, or a
    # router that mostly serves that expert "wins" against a weaker default (found on W2A8).
    each = val_report.get("moqe_vs_each") or {}
    if each:
        vals = {n: val_report["experts"][n][metric]["value"] for n in each}
        top = max(vals, key=vals.get)
        t = each[top]
        if top != val_report["best_expert"]["name"] and not (t["diff"] > 0 and t["p_value"] is not None
                                                            and t["p_value"] < alpha):
            reasons.append(f"does not significantly beat {top}, the best single expert on {metric} "
                           f"({fmt(t['diff'])}, p = {t['p_value']:.3g})")
    routed = not reasons
    if routed:
        reason = (f"MoQE beats {val_report['best_expert']['name']} on val by {fmt(gain)} (p = {p:.3g} < {alpha})"
                  + (f", more than the {copies_kind}'s {fmt(copies_gain)}" if copies_gain is not None
                     else "; no copies control was built"))
    else:
        reason = "; ".join(reasons)
    gate = {"decision": "routed" if routed else "single", "p_value": p, "val_gain": gain, "metric": metric,
            "threshold": alpha, "copies_val_gain": copies_gain, "copies_control": copies_kind,
            "reason": reason, "forced": False, "split": "router_val"}
    if force and not routed:
        gate.update(decision="routed", forced=True,
                    reason=f"forced by --force-routing; the gate would have served the single expert: {reason}")
    return gate


__all__ = ["CONTROLS_FILE", "Copies", "build_copies", "copy_recipe", "expert_cost", "gate_decision",
           "strongest_expert"]
