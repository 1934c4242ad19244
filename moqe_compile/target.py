"""Compile to an accuracy budget: the search over candidates and the decision rule
(docs/design.md#compiling-to-an-accuracy-budget).

Task-free, on plain parameters: a task plug-in says what a candidate is (``tiers``: preset
ladders, cheapest first, and how to keep the k most sensitive layers in higher precision on top
of a rung) and how to build and score one (``evaluate``); this module decides which ones to
try, which one meets the budget, and writes the frontier.

- The rule (:func:`meets`): a candidate meets ``max_drop`` when the *upper end* of the paired
  95% bootstrap interval of its drop from FP on router_val is at most ``max_drop``. The
  anchors' rule, "the point estimate is within budget" (:func:`meets_point`), is kept for
  comparison only.
- The search (:func:`search`) is not brute force: tiers are tried cheapest first; in a tier the
  ladder's rungs are tried in order until one meets the budget; when none does, the rung with
  the smallest drop gets the k most sensitive layers in higher precision, k found by doubling
  and then bisection (it assumes that more layers kept never raise the drop, as INC's
  fallback does). A deadline (``search_minutes``) stops it; what it measured is the frontier.
- The choice (:func:`choose`): the lowest measured cost among the candidates that meet the
  rule; costs within ``tie`` (relative) of the lowest count as equal, and the smaller drop
  upper bound breaks the tie (latency medians on a shared machine differ by a few percent from
  run to run).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moqe_compile.errors import BuildError
from moqe_compile.evaluate.stats import paired_bootstrap

FRONTIER_JSON = "report/frontier.json"
FRONTIER_PNG = "report/frontier.png"
FRONTIER_MD = "report/frontier.md"
COST_UNITS = {"latency": "ms", "size": "bytes", "weight_bits": "bits/weight"}


def rate_drop(fp: np.ndarray, cand: np.ndarray, groups=None) -> dict:
    """Drop of a 0/1 (or rate) per-sample metric from FP, in points: 100 * (mean fp - mean cand),
    with the paired bootstrap 95% interval (clusters: ``groups``)."""
    r = paired_bootstrap(fp, cand, groups=groups)
    return {"drop": 100 * r["diff"], "ci95": [100 * r["ci95"][0], 100 * r["ci95"][1]], "n": r["n"]}


def perplexity_drop(nll_fp: np.ndarray, nll_cand: np.ndarray, groups=None) -> dict:
    """Perplexity increase over FP in percent, 100 * (exp(mean(nll_cand - nll_fp)) - 1), from
    per-window mean NLLs of equal-length windows (monotone in the mean difference, so the
    interval maps through)."""
    r = paired_bootstrap(nll_cand, nll_fp, groups=groups)

    def pct(d: float) -> float:
        return 100 * math.expm1(d)

    return {"drop": pct(r["diff"]), "ci95": [pct(r["ci95"][0]), pct(r["ci95"][1])], "n": r["n"]}


def meets(ci95: list[float], max_drop: float) -> bool:
    """The decision rule: the upper end of the paired 95% interval of the drop is <= max_drop."""
    return ci95[1] <= max_drop


def meets_point(drop: float, max_drop: float) -> bool:
    """The anchors' rule (INC, Olive): the point estimate on the evaluation set is within budget."""
    return drop <= max_drop


@dataclass
class Candidate:
    """One measured candidate. ``kept``: layers kept in higher precision (``kept_as``: "fp" or
    "8-bit"); ``cost``: ``mean_weight_bits``, ``bytes``, and after :func:`measure_costs`
    ``latency_ms`` ({batch: median ms}); ``val``: drop on router_val (``drop``, ``ci95``, ``n``)."""

    name: str
    rung: str
    recipe: dict
    val: dict
    cost: dict
    kept: list[str] = field(default_factory=list)
    kept_as: str = ""
    meets: bool = False
    slower_than_fp: bool | None = None
    build_seconds: float = 0.0


@dataclass
class Tier:
    """Candidates of one nominal cost class, cheapest first: ``rungs`` (opaque specs the task's
    ``evaluate`` understands) and ``refine(spec, k)`` -> the spec with its k most sensitive
    layers in higher precision (None: no refinement), for k in 1..``max_k``."""

    rungs: list[Any]
    refine: Callable[[Any, int], Any] | None = None
    max_k: int = 0


@dataclass
class SearchResult:
    candidates: list[Candidate]
    seconds: float
    timed_out: bool


def search(tiers: list[Tier], evaluate: Callable[[Any], Candidate], max_drop: float, seconds: float,
           say: Callable[[str], None] = lambda m: None, clock: Callable[[], float] = time.monotonic) -> SearchResult:
    """Try candidates cheapest first (module docstring) until one meets ``max_drop`` or
    ``seconds`` have passed; every measured candidate is returned (the frontier)."""
    t0 = clock()
    out: list[Candidate] = []

    class Deadline(Exception):
        pass

    def run(spec) -> Candidate:
        if out and clock() - t0 > seconds:
            raise Deadline
        c = evaluate(spec)
        c.meets = meets(c.val["ci95"], max_drop)
        say(f"target: {c.name}: drop {c.val['drop']:.3f} [{c.val['ci95'][0]:.3f}, {c.val['ci95'][1]:.3f}] "
            f"{'meets' if c.meets else 'misses'} {max_drop}")
        out.append(c)
        return c

    try:
        for tier in tiers:
            tried = []
            for spec in tier.rungs:  # in ladder order, up to the first that meets the budget
                tried.append(run(spec))
                if tried[-1].meets:
                    break
            if any(c.meets for c in tried):
                break
            if tier.refine is None or tier.max_k < 1:
                continue
            base_i = min(range(len(tried)), key=lambda i: tried[i].val["ci95"][1])
            if _refine(tier, tier.rungs[base_i], run):
                break
    except Deadline:
        return SearchResult(out, clock() - t0, True)
    return SearchResult(out, clock() - t0, False)


def _refine(tier: Tier, base, run) -> bool:
    """Smallest k in 1..max_k whose refined candidate meets the budget: doubling, then bisection."""
    lo, k = 0, 1  # lo: the largest k known to miss
    while True:
        k = min(k, tier.max_k)
        if run(tier.refine(base, k)).meets:
            break
        lo = k
        if k == tier.max_k:
            return False
        k *= 2
    hi = k  # the smallest k known to meet
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(tier.refine(base, mid)).meets:
            hi = mid
        else:
            lo = mid
    return True


def cost_value(c: Candidate, cost: str, batch: int) -> float:
    if cost == "latency":
        return float(c.cost["latency_ms"][str(batch)])
    if cost == "size":
        return float(c.cost["bytes"])
    return float(c.cost["mean_weight_bits"])


def choose(cands: list[Candidate], cost: str, batch: int = 1, tie: float | None = None) -> int | None:
    """Index of the winner among the candidates that meet the rule (None: none does)."""
    ok = [i for i, c in enumerate(cands) if c.meets]
    if not ok:
        return None
    tie = (0.03 if cost == "latency" else 0.0) if tie is None else tie
    lowest = min(cost_value(cands[i], cost, batch) for i in ok)
    tied = [i for i in ok if cost_value(cands[i], cost, batch) <= lowest * (1 + tie)]
    return min(tied, key=lambda i: (cands[i].val["ci95"][1], cost_value(cands[i], cost, batch)))


def closest(cands: list[Candidate]) -> Candidate:
    """The candidate whose drop upper bound is smallest."""
    return min(cands, key=lambda c: c.val["ci95"][1])


def no_fit_error(cands: list[Candidate], max_drop: float, unit: str, timed_out: bool) -> BuildError:
    """The BuildError of a budget nothing meets: the closest candidate, its drop and interval, what to try."""
    if not cands:
        return BuildError(f"no candidate could be measured within the search time for max_drop = {max_drop} {unit}; "
                          "raise [target] search_minutes.")
    c = closest(cands)
    more = " The search ran out of time ([target] search_minutes); raising it tries more candidates." if timed_out else ""
    return BuildError(
        f"no candidate meets max_drop = {max_drop} {unit} on router_val (the upper end of the paired 95% interval "
        f"must be <= {max_drop}). Closest: {c.name}, drop {c.val['drop']:.3f} {unit}, 95% interval "
        f"[{c.val['ci95'][0]:.3f}, {c.val['ci95'][1]:.3f}] on n = {c.val['n']}. Try more router_val data "
        f"(a narrower interval) or more calibration data, or a larger budget (--max-drop).{more} Nothing was written.")


def measure_costs(cands: list[Candidate], runners: dict[str, Callable[[int], Callable[[], object]]],
                  fp_runner: Callable[[int], Callable[[], object]], batches: list[int], repeats: int) -> dict:
    """Latency of every candidate and of FP, timed interleaved (``evaluate/latency.py``) at each
    batch size; ``runners[name](batch)`` returns the call to time. Sets ``cost.latency_ms`` and
    ``slower_than_fp`` (at the largest batch and at batch 1 alike: slower at either flags it) and
    returns FP's medians."""
    from moqe_compile.evaluate.latency import time_interleaved

    fp_ms: dict[str, float] = {}
    for bs in batches:
        calls = {"fp": fp_runner(bs), **{n: f(bs) for n, f in runners.items()}}
        row = time_interleaved(calls, repeats)
        fp_ms[str(bs)] = row["fp"]["median_ms"]
        for c in cands:
            if c.name in row:
                c.cost.setdefault("latency_ms", {})[str(bs)] = row[c.name]["median_ms"]
    flag_slower(cands, fp_ms)
    return fp_ms


def flag_slower(cands: list[Candidate], fp_ms: dict[str, float]) -> None:
    """``slower_than_fp``: a quantized candidate whose median latency is not below FP's at some
    measured batch size (it saves nothing on this machine, whatever its bits)."""
    for c in cands:
        if "latency_ms" in c.cost:
            c.slower_than_fp = any(c.cost["latency_ms"][b] >= fp_ms[b] for b in fp_ms if b in c.cost["latency_ms"])


def choose_default(val_loss: np.ndarray, names: list[str], strongest: str | None, alpha: float,
                   groups=None) -> tuple[int, dict]:
    """The single expert a bundle serves when it does not route: the strongest preset's, unless
    another expert has a significantly lower loss on router_val (paired bootstrap, p < alpha).
    Without a strongest expert in the menu: the lowest val loss. Returns (index, rule record)."""
    mean = val_loss.mean(0)
    best = int(mean.argmin())
    if strongest not in names:
        return best, {"rule": "lowest-val-loss", "reason": "no strongest-preset expert in the menu: the lowest "
                      "router_val loss"}
    s = names.index(strongest)
    if best == s:
        return s, {"rule": "strongest", "reason": f"{strongest} has the lowest router_val loss"}
    r = paired_bootstrap(val_loss[:, best], val_loss[:, s], groups=groups)
    if r["p_value"] < alpha and r["diff"] < 0:
        return best, {"rule": "significantly-better", "p_value": r["p_value"], "val_loss_diff": r["diff"],
                      "reason": f"{names[best]} has a lower router_val loss than {strongest} "
                                f"({r['diff']:+.4g}, paired bootstrap p = {r['p_value']:.3g} < {alpha})"}
    return s, {"rule": "strongest", "p_value": r["p_value"], "val_loss_diff": r["diff"],
               "reason": f"{names[best]}'s lower router_val loss ({r['diff']:+.4g}) is not significant "
                         f"(p = {r['p_value']:.3g} >= {alpha}): the strongest preset is kept"}


def frontier(cands: list[Candidate], chosen: int | None, target: dict, unit: str, fp_latency_ms: dict,
             seconds: float, timed_out: bool, test: dict | None = None) -> dict:
    """The frontier report (``report/frontier.json``)."""
    return {"target": target, "unit": unit, "rule": "upper end of the paired 95% interval of the drop on "
            "router_val <= max_drop; lowest measured cost wins", "latency_note": "latency is the build machine's "
            "(median of interleaved rounds)", "fp_latency_ms": fp_latency_ms,
            "search_seconds": round(seconds, 2), "timed_out": timed_out,
            "chosen": None if chosen is None else cands[chosen].name, "test": test,
            "candidates": [asdict(c) for c in cands]}


def plot_frontier(doc: dict, path: str | Path) -> None:
    """Cost against val drop (with intervals), the budget line and the chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost, batch = doc["target"]["cost"], doc["target"]["batch"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in doc["candidates"]:
        x = (c["cost"].get("latency_ms", {}).get(str(batch)) if cost == "latency"
             else c["cost"]["bytes"] if cost == "size" else c["cost"]["mean_weight_bits"])
        if x is None:
            continue
        lo, hi = c["val"]["ci95"]
        color = "tab:red" if c["name"] == doc["chosen"] else ("tab:green" if c["meets"] else "tab:gray")
        ax.errorbar([x], [c["val"]["drop"]], yerr=[[c["val"]["drop"] - lo], [hi - c["val"]["drop"]]],
                    fmt="x" if c.get("slower_than_fp") else "o", color=color, capsize=3)
        ax.annotate(c["name"], (x, c["val"]["drop"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(doc["target"]["max_drop"], color="tab:blue", linestyle="--", label=f"max_drop {doc['target']['max_drop']}")
    if cost == "latency" and doc["fp_latency_ms"]:
        ax.axvline(doc["fp_latency_ms"][str(batch)], color="black", linestyle=":", label="FP latency")
    ax.set_xlabel(f"{cost} ({COST_UNITS[cost]}{f', batch {batch}, build machine' if cost == 'latency' else ''})")
    ax.set_ylabel(f"drop on router_val ({doc['unit']}), 95% interval")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cost_text(c: dict) -> str:
    lat = c["cost"].get("latency_ms", {})
    parts = [f"{c['cost']['mean_weight_bits']:.2f} bits", f"{c['cost']['bytes']} B"]
    parts += [f"b{b} {v:.3f} ms" for b, v in lat.items()]
    return ", ".join(parts)


def frontier_markdown(doc: dict) -> str:
    """The ``report.md`` section (and what ``inspect`` prints, without the heading)."""
    t = doc["target"]
    L = ["## Accuracy budget", "",
         f"max_drop {t['max_drop']} {doc['unit']}, cost {t['cost']} (batch {t['batch']}); rule: {doc['rule']}. "
         f"{doc['latency_note']}. Search {doc['search_seconds']:.1f} s"
         + (" (stopped by search_minutes)" if doc["timed_out"] else "") + ".", "",
         "| candidate | kept in higher precision | val drop [95% CI] | cost | meets | note |", "|---|---|---|---|---|---|"]
    for c in doc["candidates"]:
        v = c["val"]
        kept = f"{len(c['kept'])} at {c['kept_as']}" if c["kept"] else "-"
        note = ("**chosen**" if c["name"] == doc["chosen"] else "") + (" quantized but slower than FP"
                                                                        if c.get("slower_than_fp") else "")
        L.append(f"| {c['name']} | {kept} | {v['drop']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | "
                 f"{_cost_text(c)} | {'yes' if c['meets'] else 'no'} | {note.strip()} |")
    if doc.get("test"):
        te = doc["test"]
        L += ["", f"Test split, evaluated once for {doc['chosen']}: drop {te['drop']:.3f} [{te['ci95'][0]:.3f}, "
                  f"{te['ci95'][1]:.3f}] {doc['unit']} (n = {te['n']}): the budget "
                  f"{'held' if te['held'] else 'did NOT hold'} (interval rule); the point estimate is "
                  f"{'within' if te['point_within'] else 'outside'} the budget."]
    return "\n".join(L) + "\n"


def held_on_test(drop: dict, max_drop: float) -> dict:
    """How the chosen candidate did on the test split."""
    return {**drop, "held": meets(drop["ci95"], max_drop), "point_within": meets_point(drop["drop"], max_drop)}


def routed_within(routed_drop: dict, max_drop: float, routed_cost: float, single_cost: float) -> list[str]:
    """Why a routed bundle may not replace the budget's single expert (empty: it may)."""
    reasons = []
    if not meets(routed_drop["ci95"], max_drop):
        reasons.append(f"the routed drop's interval [{routed_drop['ci95'][0]:.3f}, {routed_drop['ci95'][1]:.3f}] "
                       f"exceeds max_drop = {max_drop}")
    if routed_cost > single_cost:
        reasons.append(f"its expected cost {routed_cost:.4g} exceeds the budget expert's {single_cost:.4g}")
    return reasons


def summary_lines(m: dict) -> list[str]:
    """``inspect``: which rule chose the single expert, and the budget when the bundle was built to one."""
    rule = m["routing"].get("default_rule")
    L = [f"default     {m['routing']['default_expert']} by rule {rule['rule']}: {rule['reason']}"] if rule else []
    f = m.get("report", {}).get("frontier")
    if f:
        v, t = f["val"], f["test"]
        L.append(f"budget      max_drop {f['max_drop']} {f['unit']}, cost {f['cost']}: chose {f['chosen']} "
                 f"({f['cost_value']:.4g}); val drop {v['drop']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}], "
                 f"test drop {t['drop']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]: "
                 f"{'held' if t['held'] else 'did NOT hold'} on test; {f['candidates']} candidates in "
                 f"{f['search_seconds']:.1f} s (frontier: {f['markdown']})")
    return L


def frontier_section(root: Path, m: dict) -> list[str]:
    """``inspect``: the frontier table of a bundle built to an accuracy budget."""
    f = m.get("report", {}).get("frontier")
    if not f:
        return []
    text = (Path(root) / f["markdown"]).read_text()
    return ["", "accuracy budget frontier:"] + [line for line in text.splitlines()[1:] if line.strip()]


def publish(write_path: Callable[[str], Path], res, chosen: int | None, c: Candidate, t, unit: str,
            fp_ms: dict, test: dict, name: str) -> dict:
    """Write the frontier (JSON, Markdown, plot) through the bundle writer's ``write_path`` and
    return the target step's result: the chosen expert, the frontier and its manifest entry."""
    doc = frontier(res.candidates, chosen, asdict(t), unit, fp_ms, res.seconds, res.timed_out, test)
    doc["expert"] = name
    write_path(FRONTIER_JSON).write_text(json.dumps(doc, indent=2))
    write_path(FRONTIER_MD).write_text(frontier_markdown(doc))
    plot_frontier(doc, write_path(FRONTIER_PNG))
    return {"expert": name, "doc": doc,
            "manifest": {"path": FRONTIER_JSON, "plot": FRONTIER_PNG, "markdown": FRONTIER_MD,
                         "max_drop": t.max_drop, "cost": t.cost, "batch": t.batch, "unit": unit,
                         "chosen": c.name, "expert": name, "val": c.val, "test": test,
                         "cost_value": cost_value(c, t.cost, t.batch), "search_seconds": round(res.seconds, 2),
                         "timed_out": res.timed_out, "candidates": len(res.candidates)}}
