"""The MoQE report of one data split: every metric with a bootstrap 95% interval, and a
paired test of MoQE against the best single expert chosen on the *validation* split.

:func:`build_split_report` takes what a build or ``moqe-compile eval`` has on hand for one
split (FP logits, every expert's logits, labels or None, the per-sample loss matrix, the
router's choice per sample and the best-on-validation expert) and returns a JSON-ready dict:

- ``fp``, ``experts.<name>``, ``best_expert`` (``name`` + metrics), ``oracle``, ``moqe``: each
  a dict of metrics ``{"value", "ci95"}``: ``top1`` (labels only), ``fp_top1_agreement``,
  ``kl_to_fp``, ``output_cosine``, ``mean_loss`` (the build's loss: KL to FP or
  cross-entropy of the label, see ``targets``).
- ``metric``: the headline metric, ``top1`` with labels, else ``fp_top1_agreement``.
- ``moqe_vs_best``: on the headline metric, ``diff`` (MoQE minus best), paired-bootstrap
  ``ci95``, ``p_value`` and ``test`` (``"mcnemar"``: exact McNemar on the 0/1 vectors;
  ``"paired-bootstrap"`` when samples are clustered by source, see ``groups``),
  ``headroom_captured`` = (moqe - best) / (oracle - best) (None when oracle == best).
- ``moqe_vs_best_loss``: the same on ``mean_loss`` with the paired-bootstrap p-value.
- ``warnings``: e.g. fewer than 30 independent units (samples, or source images), where
  bootstrap intervals understate the uncertainty.
- ``router_accuracy_vs_oracle`` (share of samples where the router picks argmin_k L[i, k]),
  ``usage`` and ``oracle_usage`` (share of samples per expert), ``n``.

:func:`to_markdown` renders it (plus latency, when measured) as a Markdown report;
:func:`write_plots` draws the PNGs (matplotlib, Agg backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moqe_compile.tasks.image.score import log_softmax, sample_losses
from moqe_compile.evaluate.stats import (DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_means, bootstrap_p_value, is_clustered,
                    mcnemar_exact)

MIN_UNITS = 30  # fewer independent samples (or source images) than this: intervals are not to be trusted
RATE_METRICS = ("top1", "fp_top1_agreement")  # 0/1 per sample, shown in percent
METRIC_TITLES = {"top1": "top-1", "fp_top1_agreement": "FP top-1 agreement", "kl_to_fp": "KL to FP",
                 "output_cosine": "output cosine", "mean_loss": "mean loss"}


def per_sample_metrics(logits: np.ndarray, fp_logits: np.ndarray, labels: np.ndarray | None,
                       loss: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample vectors whose means are the report's metrics."""
    a, b = logits.astype(np.float64), fp_logits.astype(np.float64)
    top = a.argmax(-1)
    out: dict[str, np.ndarray] = {}
    if labels is not None:
        out["top1"] = (top == labels).astype(np.float64)
    out["fp_top1_agreement"] = (top == b.argmax(-1)).astype(np.float64)
    out["kl_to_fp"] = sample_losses(a, b, None, "fp")
    out["output_cosine"] = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    out["mean_loss"] = np.asarray(loss, np.float64)
    return out


def _headroom(moqe: float, best: float, oracle: float) -> float | None:
    den = oracle - best
    return None if abs(den) < 1e-12 else float((moqe - best) / den)


def build_split_report(*, fp_logits: np.ndarray, expert_logits, expert_names: list[str],
                       labels: np.ndarray | None, loss: np.ndarray, route: np.ndarray, best_expert: str | int,
                       targets: str = "fp", split: str = "test", best_chosen_on: str = "val",
                       groups=None, n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                       level: float = 0.95, strongest: str | None = None, expert_costs: dict | None = None,
                       expert_val_loss: dict | None = None,
                       copies: dict | None = None) -> dict:
    """Report of one split (see the module docstring for the keys).

    ``expert_logits``: (K, N, C) or a list of K (N, C) arrays, in ``expert_names`` order;
    ``loss``: (N, K) per-sample loss ``L[i, k]``; ``route``: (N,) chosen expert index per
    sample; ``best_expert``: name or index of the single expert chosen on validation data;
    ``targets``: what ``loss`` measures (``"fp"`` = KL to FP, ``"labels"`` = cross-entropy);
    ``groups``: optional source id per sample. When samples share sources (augmented views of
    one image), intervals and p-values come from the cluster bootstrap over sources, and the
    headline test is the paired bootstrap (McNemar assumes independent pairs; its p-value is
    kept as ``moqe_vs_best.mcnemar_iid_p_value`` for reference only).

    Controls (issue 10): ``strongest`` names the strongest-preset expert (its distance to FP
    is reported); ``expert_costs`` maps expert name -> cost (mean weight bits) for
    ``controls.cost_matched``; ``copies`` holds the copies control of this split (see
    :func:`copies_entries`): ``{"loss": (N, Kc), "pred": (N, Kc), "route": (N,) | None,
    "best": int, "preset", "names"}``.
    """
    ex = np.asarray(expert_logits)
    K, N = len(expert_names), len(fp_logits)
    loss, route = np.asarray(loss, np.float64), np.asarray(route).astype(np.int64)
    if ex.shape[:2] != (K, N) or loss.shape != (N, K) or route.shape != (N,):
        raise ValueError(f"shapes disagree: expert_logits {ex.shape}, loss {loss.shape}, route {route.shape}; "
                         f"expected ({K}, {N}, C), ({N}, {K}), ({N},).")
    if N == 0:
        raise ValueError("cannot report on an empty split.")
    if route.min() < 0 or route.max() >= K:
        raise ValueError(f"route holds expert indices outside [0, {K}).")
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
    if targets == "labels" and labels is None:
        raise ValueError("targets = 'labels' needs labels.")
    best_k = expert_names.index(best_expert) if isinstance(best_expert, str) else int(best_expert)
    idx = np.arange(N)
    oracle = loss.argmin(axis=1)

    fp_loss = sample_losses(fp_logits, fp_logits, labels, targets)
    entries = {"fp": per_sample_metrics(fp_logits, fp_logits, labels, fp_loss)}
    for k, name in enumerate(expert_names):
        entries[f"expert:{name}"] = per_sample_metrics(ex[k], fp_logits, labels, loss[:, k])
    entries["oracle"] = per_sample_metrics(ex[oracle, idx], fp_logits, labels, loss[idx, oracle])
    entries["moqe"] = per_sample_metrics(ex[route, idx], fp_logits, labels, loss[idx, route])
    # Control: the router's own expert mix, shuffled across inputs (same usage, no input
    # information). A router that does not beat this has learned nothing about the inputs.
    rand = np.random.default_rng(seed).permutation(route)
    entries["random_router"] = per_sample_metrics(ex[rand, idx], fp_logits, labels, loss[idx, rand])
    metric = "top1" if labels is not None else "fp_top1_agreement"
    # Control: the authors' soft mixture (every expert runs; probabilities averaged).
    mix = np.log(np.mean([np.exp(log_softmax(e)) for e in ex], axis=0) + 1e-30)
    entries["mixture"] = per_sample_metrics(mix, fp_logits, labels, sample_losses(mix, fp_logits, labels, targets))
    moqe_v, best_v = entries["moqe"], entries[f"expert:{expert_names[best_k]}"]
    extra = {"diff:metric": moqe_v[metric] - best_v[metric],
             "diff:mean_loss": moqe_v["mean_loss"] - best_v["mean_loss"],
             "diff:mixture": entries["mixture"][metric] - best_v[metric],
             "router_accuracy": (route == oracle).astype(np.float64)}
    strongest_k = expert_names.index(strongest) if strongest in expert_names else None
    if strongest_k is not None:
        sv = entries[f"expert:{strongest}"]
        extra["diff:strongest_fp"] = sv[metric] - entries["fp"][metric]
    target = labels if labels is not None else np.asarray(fp_logits).argmax(-1)
    if copies is not None:
        entries.update(copies_entries(copies, target, metric))
        c_best = entries[f"copy:{copies['names'][copies['best']]}"]
        if "copies_router" in entries:
            # Difference in differences, per sample: MoQE's gain over its best single expert
            # minus the copies router's gain over the best copy (both chosen on validation).
            extra["diff:moqe_vs_copies"] = ((moqe_v[metric] - best_v[metric])
                                            - (entries["copies_router"][metric] - c_best[metric]))
        extra["diff:copies_oracle_gain"] = entries["copies_oracle"][metric] - c_best[metric]
    cost = _cost_matched(expert_names, expert_costs, route, entries, metric, expert_val_loss, split)
    if cost.get("applicable"):
        extra["diff:cost_matched"] = moqe_v[metric] - cost.pop("_vector")

    # One set of resamples for every vector: all intervals of the report are paired.
    keys = [(e, m) for e, ms in entries.items() for m in ms] + list(extra)
    mat = np.stack([entries[k[0]][k[1]] if isinstance(k, tuple) else extra[k] for k in keys])
    clustered = is_clustered(groups, N)
    boot = bootstrap_means(mat, n_boot, seed, groups if clustered else None)
    q = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
    stat = {k: {"value": float(mat[j].mean()), "ci95": [float(q[0, j]), float(q[1, j])]} for j, k in enumerate(keys)}
    stat["_boot"], stat["_keys"] = boot, keys

    def entry(e: str) -> dict:
        return {m: stat[(e, m)] for m in entries[e]}

    def value(e: str, m: str) -> float:
        return stat[(e, m)]["value"]

    best_name = expert_names[best_k]
    mc = mcnemar_exact(moqe_v[metric], best_v[metric])
    j_metric, j_loss = keys.index("diff:metric"), keys.index("diff:mean_loss")
    if clustered:
        head_test = {"p_value": bootstrap_p_value(stat["diff:metric"]["value"], boot[:, j_metric]),
                     "test": "paired-bootstrap", "mcnemar_iid_p_value": mc["p_value"]}
    else:
        head_test = {"p_value": mc["p_value"], "test": "mcnemar"}
    units = int(len(np.unique(np.asarray(groups)))) if clustered else int(N)
    warnings = []
    if units < MIN_UNITS:
        warnings.append(f"only {units} independent {'source images' if clustered else 'samples'}: bootstrap "
                        f"intervals and p-values are unreliable below about {MIN_UNITS} (they understate the "
                        "uncertainty); treat every number here as descriptive.")
    return {
        "split": split,
        "n": int(N),
        "labels": labels is not None,
        "targets": targets,
        "metric": metric,
        "level": level,
        "bootstrap": {"resamples": int(n_boot), "seed": int(seed), "interval": "percentile", "paired": True,
                      "unit": "source" if clustered else "sample",
                      "clusters": units},
        "warnings": warnings,
        "fp": entry("fp"),
        "experts": {n: entry(f"expert:{n}") for n in expert_names},
        "best_expert": {"name": best_name, "chosen_on": best_chosen_on, **entry(f"expert:{best_name}")},
        "oracle": entry("oracle"),
        "moqe": entry("moqe"),
        "random_router": entry("random_router"),
        "strongest_expert": (None if strongest_k is None else
                             {"name": strongest, **entry(f"expert:{strongest}"),
                              "distance_to_fp": _diff_entry(stat, "diff:strongest_fp", metric)}),
        "controls": _controls(stat, entry, entries, extra, metric, copies, cost, expert_names),
        "moqe_vs_best": {
            "metric": metric,
            "diff": stat["diff:metric"]["value"],
            "ci95": stat["diff:metric"]["ci95"],
            **head_test,
            "discordant": {"moqe_only": mc["a_only"], "best_only": mc["b_only"]},
            "headroom_captured": _headroom(value("moqe", metric), value(f"expert:{best_name}", metric),
                                           value("oracle", metric)),
        },
        "moqe_vs_best_loss": {
            "metric": "mean_loss",
            "diff": stat["diff:mean_loss"]["value"],
            "ci95": stat["diff:mean_loss"]["ci95"],
            "p_value": bootstrap_p_value(stat["diff:mean_loss"]["value"], boot[:, j_loss]),
            "test": "paired-bootstrap",
            "headroom_captured": _headroom(value("moqe", "mean_loss"), value(f"expert:{best_name}", "mean_loss"),
                                           value("oracle", "mean_loss")),
        },
        "moqe_vs_each": {n: {"metric": metric, "diff": value("moqe", metric) - value(f"expert:{n}", metric),
                             "p_value": (mcnemar_exact(moqe_v[metric], entries[f"expert:{n}"][metric])["p_value"]
                                         if metric in ("top1", "fp_top1_agreement") else None),
                             "test": "mcnemar"} for n in expert_names},
        "router_accuracy_vs_oracle": stat["router_accuracy"],
        "usage": {n: float((route == k).mean()) for k, n in enumerate(expert_names)},
        "oracle_usage": {n: float((oracle == k).mean()) for k, n in enumerate(expert_names)},
    }


def copies_entries(copies: dict, target: np.ndarray, metric: str) -> dict:
    """Per-sample vectors of the copies control: each copy, their oracle (argmin loss per
    sample) and, when given, a router trained on the copies (``route``). Copies are stored as
    losses and predicted classes only (they are not shipped), so their entries carry the
    headline metric and ``mean_loss``."""
    loss, pred = np.asarray(copies["loss"], np.float64), np.asarray(copies["pred"])
    n, kc = loss.shape
    idx = np.arange(n)

    def ent(choice: np.ndarray) -> dict:
        return {metric: (pred[idx, choice] == target).astype(np.float64), "mean_loss": loss[idx, choice]}

    out = {f"copy:{name}": ent(np.full(n, j)) for j, name in enumerate(copies["names"])}
    out["copies_oracle"] = ent(loss.argmin(1))
    if copies.get("route") is not None:
        out["copies_router"] = ent(np.asarray(copies["route"]).astype(np.int64))
    return out


def _diff_entry(stat: dict, key: str, metric: str) -> dict:
    return {"metric": metric, "diff": stat[key]["value"], "ci95": stat[key]["ci95"]}


def _cost_matched(names: list[str], costs: dict | None, route: np.ndarray, entries: dict, metric: str,
                  val_loss: dict | None = None, split: str = "test") -> dict:
    """MoQE against single experts at its expected cost: the best single expert at or below
    that cost and the best at or above it, linearly interpolated at the expected cost.
    "Best" is by mean validation loss (``val_loss``, from the build) so nothing is selected on
    the split being reported; without it (old bundles) by this split's metric, and it says so."""
    if not costs or any(n not in costs for n in names):
        return {"applicable": False, "reason": "expert costs unknown"}
    c = np.array([float(costs[n]) for n in names])
    usage = np.bincount(route, minlength=len(names)) / len(route)
    expected = float(usage @ c)
    base = {"cost": "mean weight bits", "expert_costs": {n: float(v) for n, v in zip(names, c)},
            "moqe_expected_cost": expected}
    if np.ptp(c) == 0:
        return {"applicable": False, **base, "reason": "every expert has the same cost: the best single expert "
                                                        "is the cost-matched comparison"}
    if val_loss and all(n in val_loss for n in names):
        score, chosen_on = {n: -float(val_loss[n]) for n in names}, "val"
    else:
        score, chosen_on = {n: entries[f"expert:{n}"][metric].mean() for n in names}, split
    pair = frontier_pair(names, c, expected, score)
    if pair is None:  # cannot happen: the expected cost lies within [min c, max c]
        return {"applicable": False, **base, "reason": "no expert brackets the expected cost"}
    lo, hi, wl = pair
    vec = wl * entries[f"expert:{lo}"][metric] + (1 - wl) * entries[f"expert:{hi}"][metric]
    return {"applicable": True, **base, "cheaper": lo, "costlier": hi, "weight_cheaper": float(wl),
            "chosen_on": chosen_on, "_vector": vec}


def frontier_pair(names: list[str], costs, expected: float, score: dict) -> tuple[str, str, float] | None:
    """The random mix of two single experts that costs ``expected`` on average and scores best:
    over every pair (cheaper <= expected <= costlier), the one whose linear interpolation of
    ``score`` at ``expected`` is highest -> (cheaper, costlier, weight of the cheaper).

    Not "the best expert on each side": that skips an expert that costs a hair more than
    MoQE and is as good as MoQE (found on the W2A8 layer-group case, where it made a router
    that served that expert 90% of the time look +1 point better than its cost)."""
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


def _controls(stat, entry, entries, extra, metric, copies, cost, names) -> dict:
    def sub(e: str) -> dict:
        return {m: stat[(e, m)] for m in entries[e]}

    out = {"random_router": entry("random_router"),
           "mixture": {**entry("mixture"), "cost_experts_run": len(names),
                       "vs_best": _diff_entry(stat, "diff:mixture", metric)}}
    if copies is not None:
        c_names = list(copies["names"])
        best_copy = c_names[copies["best"]]
        co = {"preset": copies.get("preset"), "copies": len(c_names), "best_copy": best_copy,
              "best_copy_chosen_on": "val", "copies_metrics": {n: sub(f"copy:{n}") for n in c_names},
              **sub("copies_oracle"),
              "oracle_gain": _diff_entry(stat, "diff:copies_oracle_gain", metric)}
        if "copies_router" in entries:
            co["router"] = sub("copies_router")
            d = stat["diff:moqe_vs_copies"]
            co["moqe_vs_copies"] = {"metric": metric, "diff": d["value"], "ci95": d["ci95"],
                                    "p_value": bootstrap_p_value(d["value"], stat["_boot"][:, stat["_keys"].index(
                                        "diff:moqe_vs_copies")]),
                                    "test": "paired-bootstrap",
                                    "meaning": "(MoQE - best single) - (copies router - best copy), per sample"}
        out["copies_oracle"] = co
    else:
        out["copies_oracle"] = None
    if cost.get("applicable"):
        d = stat["diff:cost_matched"]
        cost = {**cost, "moqe_minus_interpolated": {"metric": metric, "diff": d["value"], "ci95": d["ci95"],
                                                    "p_value": bootstrap_p_value(d["value"], stat["_boot"][:, stat[
                                                        "_keys"].index("diff:cost_matched")])}}
    out["cost_matched"] = cost
    return out


def flat_metrics(entry: dict, n: int) -> dict:
    """``{"n", metric: value}`` of one report entry (the manifest's ``experts[].metrics.test``)."""
    return {"n": int(n), **{k: v["value"] for k, v in entry.items() if isinstance(v, dict) and "value" in v}}


# ---------------------------------------------------------------- Markdown


def _fmt(metric: str, v: float) -> str:
    if metric in RATE_METRICS:
        return f"{100 * v:.2f}"
    return f"{v:.4f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"


def _cell(metric: str, m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{_fmt(metric, m['value'])} [{_fmt(metric, lo)}, {_fmt(metric, hi)}]"


def _signed(metric: str, v: float) -> str:
    if metric in RATE_METRICS:
        return f"{100 * v:+.2f}"
    return f"{v:+.4f}" if v == 0 or abs(v) >= 0.01 else f"{v:+.3g}"


def _diff(metric: str, d: dict) -> str:
    unit = " points" if metric in RATE_METRICS else ""
    return f"{_signed(metric, d['diff'])}{unit} [95% CI {_signed(metric, d['ci95'][0])}, {_signed(metric, d['ci95'][1])}]"


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else "< 0.001"


def loss_title(targets: str) -> str:
    return "cross-entropy" if targets == "labels" else "KL to FP"


def to_markdown(rep: dict, title: str | None = None, latency: dict | None = None) -> str:
    """Markdown of a split report (and of a latency table from :mod:`.latency`)."""
    metric, best = rep["metric"], rep["best_expert"]["name"]
    cols = [m for m in ("top1", "fp_top1_agreement", "kl_to_fp") if m in rep["fp"]]
    if rep["targets"] == "labels":
        cols.append("mean_loss")
    head = [f"{METRIC_TITLES[c]}{' %' if c in RATE_METRICS else ''}"
            + (f" ({loss_title(rep['targets'])})" if c == "mean_loss" else "") for c in cols]
    L = []
    if title:
        L += [f"## {title}", ""]
    bs = rep["bootstrap"]
    unit = (f"resampling the {bs['clusters']} source images, not their augmented views (which are not "
            "independent)" if bs.get("unit") == "source" else "resampling samples")
    L += [f"n = {rep['n']} samples of split `{rep['split']}`; labels: {'yes' if rep['labels'] else 'no'}; "
          f"expert loss L = {loss_title(rep['targets'])}; intervals: {int(rep['level'] * 100)}% percentile "
          f"bootstrap, {unit} ({bs['resamples']} paired resamples, seed {bs['seed']}).", ""]
    L.append("| model | " + " | ".join(f"{h} [95% CI]" for h in head) + " |")
    L.append("|---|" + "---:|" * len(cols))
    rows = [("FP32", rep["fp"])]
    for n, e in rep["experts"].items():
        rows.append((f"expert {n}" + (f" (best on {rep['best_expert']['chosen_on']})" if n == best else ""), e))
    rows += [("oracle (per-sample argmin L)", rep["oracle"])]
    if "random_router" in rep:
        rows.append(("control: random router (MoQE's usage, shuffled)", rep["random_router"]))
    ctl = rep.get("controls") or {}
    if ctl.get("mixture"):
        rows.append((f"control: output-averaging mixture (runs all {ctl['mixture']['cost_experts_run']} experts)",
                     ctl["mixture"]))
    co = ctl.get("copies_oracle")
    if co:
        rows.append((f"control: best of {co['copies']} `{co['preset']}` copies ({co['best_copy']}, on val)",
                     co["copies_metrics"][co["best_copy"]]))
        rows.append((f"control: copies oracle ({co['copies']} copies, disjoint calibration subsets)", co))
        if co.get("router"):
            rows.append(("control: router trained on the copies", co["router"]))
    rows.append(("**MoQE** (router + 1 expert)", rep["moqe"]))
    for name, e in rows:
        L.append(f"| {name} | " + " | ".join(_cell(c, e[c]) if c in e else "-" for c in cols) + " |")
    vb, vl = rep["moqe_vs_best"], rep["moqe_vs_best_loss"]
    hc = vb["headroom_captured"]
    hl = vl["headroom_captured"]
    if vb["test"] == "mcnemar":
        test_txt = f"exact McNemar p = {_p(vb['p_value'])}"
    else:
        test_txt = (f"paired cluster-bootstrap p = {_p(vb['p_value'])} (exact McNemar, which wrongly assumes "
                    f"independent samples: p = {_p(vb['mcnemar_iid_p_value'])})")
    L += ["",
          f"**MoQE vs best single expert ({best})**, {METRIC_TITLES[metric]}: {_diff(metric, vb)}, {test_txt}; "
          f"discordant samples: only MoQE right on {vb['discordant']['moqe_only']}, only {best} right on "
          f"{vb['discordant']['best_only']}; headroom captured "
          + ("n/a (oracle = best)" if hc is None else f"{hc:.2f}") + ".",
          f"Mean loss ({loss_title(rep['targets'])}): {_diff('mean_loss', vl)}, paired-bootstrap "
          f"p = {_p(vl['p_value'])}; headroom captured " + ("n/a (oracle = best)" if hl is None else f"{hl:.2f}") + ".",
          f"Router accuracy vs oracle: {_cell('top1', rep['router_accuracy_vs_oracle'])} %."]
    L += _controls_markdown(rep, metric)
    L += [
          "", "| expert | router usage % | oracle usage % |", "|---|---:|---:|"]
    for n in rep["experts"]:
        L.append(f"| {n} | {100 * rep['usage'][n]:.1f} | {100 * rep['oracle_usage'][n]:.1f} |")
    for w in rep.get("warnings", []):
        L += ["", f"**Warning:** {w}"]
    if latency:
        L += ["", latency_markdown(latency)]
    return "\n".join(L) + "\n"


def _controls_markdown(rep: dict, metric: str) -> list[str]:
    L = []
    st = rep.get("strongest_expert")
    if st:
        L.append(f"Strongest-preset expert {st['name']}: {METRIC_TITLES[metric]} minus FP "
                 f"{_diff(metric, st['distance_to_fp'])}.")
    else:
        L.append("No strongest-preset expert in this set: the baseline routing must beat is missing.")
    ctl = rep.get("controls") or {}
    if ctl.get("mixture"):
        L.append(f"Output-averaging mixture minus best single: {_diff(metric, ctl['mixture']['vs_best'])} "
                 f"(costs all {ctl['mixture']['cost_experts_run']} experts per input).")
    co = ctl.get("copies_oracle")
    if co:
        L.append(f"Copies control: oracle of {co['copies']} copies minus the best copy "
                 f"{_diff(metric, co['oracle_gain'])} (the headroom calibration noise alone leaves).")
        if co.get("moqe_vs_copies"):
            d = co["moqe_vs_copies"]
            L.append(f"MoQE's gain over its best single expert minus the copies router's gain over the best copy: "
                     f"{_diff(metric, d)}, paired-bootstrap p = {_p(d['p_value'])}.")
    else:
        L.append("Copies control: not available for this data (the copies are stored for the bundle's own splits only).")
    cm = ctl.get("cost_matched") or {}
    if cm.get("applicable"):
        d = cm["moqe_minus_interpolated"]
        L.append(f"Cost-matched: MoQE's expected cost {cm['moqe_expected_cost']:.2f} {cm['cost']} lies between "
                 f"{cm['cheaper']} ({cm['expert_costs'][cm['cheaper']]:g}) and {cm['costlier']} "
                 f"({cm['expert_costs'][cm['costlier']]:g}); MoQE minus their interpolation at that cost: "
                 f"{_diff(metric, d)}, p = {_p(d['p_value'])}.")
    elif cm:
        L.append(f"Cost-matched control: not applicable ({cm.get('reason')}).")
    return L


def latency_markdown(lat: dict) -> str:
    rows = lat["batches"]
    first = next(iter(rows.values()))
    cands = [k for k in first if isinstance(first[k], dict) and "median_ms" in first[k]]
    L = [f"Latency, ONNX Runtime CPU, median ms over {lat['repeats']} interleaved rounds ({lat.get('cpu', '')}):", "",
         "| batch | " + " | ".join(cands) + " |", "|---:|" + "---:|" * len(cands)]
    for bs, row in rows.items():
        L.append(f"| {bs} | " + " | ".join(f"{row[c]['median_ms']:.2f}" for c in cands) + " |")
    return "\n".join(L)


# ---------------------------------------------------------------- plots


def write_plots(rep: dict, out_dir: str | Path) -> list[Path]:
    """``metric.png`` (headline metric and mean loss, each a point with its 95% interval, for
    FP, every expert, the oracle and MoQE; the best-on-validation expert marked and drawn as a
    dashed line) and ``usage.png`` (share of samples per expert: router vs oracle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    best = rep["best_expert"]["name"]
    names = ["FP32", *[f"{n}\n(best)" if n == best else n for n in rep["experts"]], "oracle", "MoQE"]
    entries = [rep["fp"], *rep["experts"].values(), rep["oracle"], rep["moqe"]]
    colors = ["0.6", *["tab:orange" if n == best else "tab:blue" for n in rep["experts"]], "tab:green", "tab:red"]
    metrics = [rep["metric"], "mean_loss"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 4.2))
    for ax, m in zip(axes, metrics):
        scale = 100.0 if m in RATE_METRICS else 1.0
        v = np.array([e[m]["value"] for e in entries]) * scale
        lo = np.array([e[m]["ci95"][0] for e in entries]) * scale
        hi = np.array([e[m]["ci95"][1] for e in entries]) * scale
        x = np.arange(len(names))
        # Points with interval bars (no bars from zero: a truncated axis would exaggerate gaps);
        # the dashed line is the best-on-validation expert, the one MoQE must beat.
        for xi, vi, l, h, c in zip(x, v, lo, hi, colors):
            ax.errorbar([xi], [vi], yerr=[[max(vi - l, 0)], [max(h - vi, 0)]], fmt="o", color=c, capsize=5, ms=7)
        ax.axhline(rep["best_expert"][m]["value"] * scale, color="tab:orange", ls="--", lw=1)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        title = METRIC_TITLES[m] + (" %" if scale == 100 else "")
        if m == "mean_loss":
            title += f" ({loss_title(rep['targets'])}, lower is better)"
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"split {rep['split']}, n = {rep['n']}, 95% bootstrap CI", fontsize=10)
    fig.tight_layout()
    p1 = out_dir / "metric.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    ex = list(rep["experts"])
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(ex), 3.6))
    x = np.arange(len(ex))
    ax.bar(x - 0.2, [100 * rep["usage"][n] for n in ex], 0.4, label="router", color="tab:red")
    ax.bar(x + 0.2, [100 * rep["oracle_usage"][n] for n in ex], 0.4, label="oracle", color="tab:green")
    ax.set_xticks(x, ex)
    ax.set_ylabel("% of samples")
    ax.set_title(f"expert usage, split {rep['split']} (n = {rep['n']})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    p2 = out_dir / "usage.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]
