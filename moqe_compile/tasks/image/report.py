"""The image-classification report of one data split: every metric with a bootstrap 95% interval, and a
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

from moqe_compile.evaluate.controls import copies_entries, copies_summary, cost_matched, interpolate, random_route
from moqe_compile.evaluate.losses import log_softmax, sample_losses
from moqe_compile.evaluate.report import (METRIC_TITLES, RATE_METRICS, BootstrapTable, ControlsText, cell,
                                          controls_markdown, diff_text, headroom, latency_markdown, loss_title,
                                          p_text, unit_warnings)
from moqe_compile.evaluate.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, mcnemar_exact
from moqe_compile.gate import Comparison, decide


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

    Controls (docs/design.md#controls-and-the-gate): ``strongest`` names the strongest-preset
    expert (its distance to FP is reported); ``expert_costs`` maps expert name -> cost (mean
    weight bits) for ``controls.cost_matched``; ``copies`` holds the copies control of this
    split: ``{"loss": (N, Kc), "pred": (N, Kc), "route": (N,) | None, "best": int, "preset",
    "names"}``.
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

    def routed(choice: np.ndarray) -> dict:
        return per_sample_metrics(ex[choice, idx], fp_logits, labels, loss[idx, choice])

    fp_loss = sample_losses(fp_logits, fp_logits, labels, targets)
    entries = {"fp": per_sample_metrics(fp_logits, fp_logits, labels, fp_loss)}
    for k, name in enumerate(expert_names):
        entries[f"expert:{name}"] = per_sample_metrics(ex[k], fp_logits, labels, loss[:, k])
    entries["oracle"] = routed(oracle)
    entries["moqe"] = routed(route)
    entries["random_router"] = routed(random_route(route, seed))
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
        extra["diff:strongest_fp"] = entries[f"expert:{strongest}"][metric] - entries["fp"][metric]
    if copies is not None:
        target = labels if labels is not None else np.asarray(fp_logits).argmax(-1)
        entries.update(_copies_vectors(copies, target, metric))
        c_best = entries[f"copy:{copies['names'][copies['best']]}"]
        if "copies_router" in entries:
            # Difference in differences, per sample: MoQE's gain over its best single expert
            # minus the copies router's gain over the best copy (both chosen on validation).
            extra["diff:moqe_vs_copies"] = ((moqe_v[metric] - best_v[metric])
                                            - (entries["copies_router"][metric] - c_best[metric]))
        extra["diff:copies_oracle_gain"] = entries["copies_oracle"][metric] - c_best[metric]
    cost = cost_matched(expert_names, expert_costs, route, expert_val_loss,
                        {n: entries[f"expert:{n}"][metric].mean() for n in expert_names}, split)
    if cost.get("applicable"):
        extra["diff:cost_matched"] = moqe_v[metric] - interpolate(cost, lambda n: entries[f"expert:{n}"][metric])

    vectors = {(e, m): v for e, ms in entries.items() for m, v in ms.items()}
    table = BootstrapTable({**vectors, **extra}, n_boot, seed, groups, level)

    def entry(e: str) -> dict:
        return {m: table[(e, m)] for m in entries[e]}

    def value(e: str, m: str) -> float:
        return table.value((e, m))

    best_name = expert_names[best_k]
    mc = mcnemar_exact(moqe_v[metric], best_v[metric])
    if table.clustered:
        head_test = {"p_value": table.p_value("diff:metric"), "test": "paired-bootstrap",
                     "mcnemar_iid_p_value": mc["p_value"]}
    else:
        head_test = {"p_value": mc["p_value"], "test": "mcnemar"}
    return {
        "split": split,
        "n": int(N),
        "labels": labels is not None,
        "targets": targets,
        "metric": metric,
        "level": level,
        "bootstrap": {"resamples": int(n_boot), "seed": int(seed), "interval": "percentile", "paired": True,
                      "unit": "source" if table.clustered else "sample",
                      "clusters": table.units},
        "warnings": unit_warnings(table.units, table.clustered),
        "fp": entry("fp"),
        "experts": {n: entry(f"expert:{n}") for n in expert_names},
        "best_expert": {"name": best_name, "chosen_on": best_chosen_on, **entry(f"expert:{best_name}")},
        "oracle": entry("oracle"),
        "moqe": entry("moqe"),
        "random_router": entry("random_router"),
        "strongest_expert": (None if strongest_k is None else
                             {"name": strongest, **entry(f"expert:{strongest}"),
                              "distance_to_fp": table.diff("diff:strongest_fp", metric)}),
        "controls": _controls(table, entry, entries, metric, copies, cost, K),
        "moqe_vs_best": {
            "metric": metric,
            "diff": table.value("diff:metric"),
            "ci95": table["diff:metric"]["ci95"],
            **head_test,
            "discordant": {"moqe_only": mc["a_only"], "best_only": mc["b_only"]},
            "headroom_captured": headroom(value("moqe", metric), value(f"expert:{best_name}", metric),
                                          value("oracle", metric)),
        },
        "moqe_vs_best_loss": {
            "metric": "mean_loss",
            "diff": table.value("diff:mean_loss"),
            "ci95": table["diff:mean_loss"]["ci95"],
            "p_value": table.p_value("diff:mean_loss"),
            "test": "paired-bootstrap",
            "headroom_captured": headroom(value("moqe", "mean_loss"), value(f"expert:{best_name}", "mean_loss"),
                                          value("oracle", "mean_loss")),
        },
        "moqe_vs_each": {n: {"metric": metric, "diff": value("moqe", metric) - value(f"expert:{n}", metric),
                             "p_value": (mcnemar_exact(moqe_v[metric], entries[f"expert:{n}"][metric])["p_value"]
                                         if metric in RATE_METRICS else None),
                             "test": "mcnemar"} for n in expert_names},
        "router_accuracy_vs_oracle": table["router_accuracy"],
        "usage": {n: float((route == k).mean()) for k, n in enumerate(expert_names)},
        "oracle_usage": {n: float((oracle == k).mean()) for k, n in enumerate(expert_names)},
    }


def _copies_vectors(copies: dict, target: np.ndarray, metric: str) -> dict:
    """The copies control's entries. Copies are stored as losses and predicted classes only
    (they are not shipped), so their entries carry the headline metric and ``mean_loss``."""
    loss, pred = np.asarray(copies["loss"], np.float64), np.asarray(copies["pred"])
    idx = np.arange(len(loss))

    def measure(choice: np.ndarray) -> dict:
        return {metric: (pred[idx, choice] == target).astype(np.float64), "mean_loss": loss[idx, choice]}

    return copies_entries(copies, measure)


def _controls(table: BootstrapTable, entry, entries: dict, metric: str, copies: dict | None, cost: dict,
              experts_run: int) -> dict:
    out = {"random_router": entry("random_router"),
           "mixture": {**entry("mixture"), "cost_experts_run": experts_run,
                       "vs_best": table.diff("diff:mixture", metric)}}
    out["copies_oracle"] = None
    if copies is not None:
        co = copies_summary(copies, "preset", entry, table.diff("diff:copies_oracle_gain", metric))
        if "copies_router" in entries:
            co["router"] = entry("copies_router")
            co["moqe_vs_copies"] = {**table.diff("diff:moqe_vs_copies", metric),
                                    "p_value": table.p_value("diff:moqe_vs_copies"), "test": "paired-bootstrap",
                                    "meaning": "(MoQE - best single) - (copies router - best copy), per sample"}
        out["copies_oracle"] = co
    if cost.get("applicable"):
        cost = {**cost, "moqe_minus_interpolated": {**table.diff("diff:cost_matched", metric),
                                                    "p_value": table.p_value("diff:cost_matched")}}
    out["cost_matched"] = cost
    return out


def gate_decision(val_report: dict, alpha: float, force: bool) -> dict:
    """``router.gate`` from the router_val split report (:func:`moqe_compile.gate.decide`).

    The copies bar is the copies router's gain over the best copy, else the copies oracle's
    headroom. The headline comparison is against the expert best on the headline metric:
    the best single expert is chosen by loss (what the bundle serves when routing is
    refused), which need not be the best on top-1."""
    vb = val_report["moqe_vs_best"]
    metric = vb["metric"]
    best = Comparison(val_report["best_expert"]["name"], float(vb["diff"]), float(vb["p_value"]))
    co = (val_report.get("controls") or {}).get("copies_oracle")
    copies_gain = kind = None
    if co and co.get("router"):
        best_copy = co["copies_metrics"][co["best_copy"]][metric]["value"]
        copies_gain, kind = co["router"][metric]["value"] - best_copy, "copies router"
    elif co:
        copies_gain, kind = co["oracle_gain"]["diff"], "copies oracle headroom"
    headline = None
    each = val_report.get("moqe_vs_each") or {}
    if each:
        top = max(each, key=lambda n: val_report["experts"][n][metric]["value"])
        headline = Comparison(top, float(each[top]["diff"]), each[top]["p_value"])
    return decide(best, alpha, force, metric, copies_gain, kind, headline)


# ---------------------------------------------------------------- Markdown


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
        L.append(f"| {name} | " + " | ".join(cell(c, e[c]) if c in e else "-" for c in cols) + " |")
    vb, vl = rep["moqe_vs_best"], rep["moqe_vs_best_loss"]
    hc = vb["headroom_captured"]
    hl = vl["headroom_captured"]
    if vb["test"] == "mcnemar":
        test_txt = f"exact McNemar p = {p_text(vb['p_value'])}"
    else:
        test_txt = (f"paired cluster-bootstrap p = {p_text(vb['p_value'])} (exact McNemar, which wrongly assumes "
                    f"independent samples: p = {p_text(vb['mcnemar_iid_p_value'])})")
    L += ["",
          f"**MoQE vs best single expert ({best})**, {METRIC_TITLES[metric]}: {diff_text(metric, vb)}, {test_txt}; "
          f"discordant samples: only MoQE right on {vb['discordant']['moqe_only']}, only {best} right on "
          f"{vb['discordant']['best_only']}; headroom captured "
          + ("n/a (oracle = best)" if hc is None else f"{hc:.2f}") + ".",
          f"Mean loss ({loss_title(rep['targets'])}): {diff_text('mean_loss', vl)}, paired-bootstrap "
          f"p = {p_text(vl['p_value'])}; headroom captured " + ("n/a (oracle = best)" if hl is None else f"{hl:.2f}") + ".",
          f"Router accuracy vs oracle: {cell('top1', rep['router_accuracy_vs_oracle'])} %."]
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


class _ControlsText(ControlsText):
    def __init__(self, metric: str):
        self.metric = metric

    def mixture(self, m: dict) -> list[str]:
        return [f"Output-averaging mixture minus best single: {diff_text(self.metric, m['vs_best'])} "
                f"(costs all {m['cost_experts_run']} experts per input)."]

    def copies(self, co: dict) -> list[str]:
        return [f"Copies control: oracle of {co['copies']} copies minus the best copy "
                f"{diff_text(self.metric, co['oracle_gain'])} (the headroom calibration noise alone leaves)."]

    def copies_router(self, co: dict) -> list[str]:
        d = co["moqe_vs_copies"]
        return [f"MoQE's gain over its best single expert minus the copies router's gain over the best copy: "
                f"{diff_text(self.metric, d)}, paired-bootstrap p = {p_text(d['p_value'])}."]

    def no_copies(self) -> list[str]:
        return ["Copies control: not available for this data (the copies are stored for the bundle's own splits "
                "only)."]

    def cost_matched(self, cm: dict) -> list[str]:
        d = cm["moqe_minus_interpolated"]
        return [f"Cost-matched: MoQE's expected cost {cm['moqe_expected_cost']:.2f} {cm['cost']} lies between "
                f"{cm['cheaper']} ({cm['expert_costs'][cm['cheaper']]:g}) and {cm['costlier']} "
                f"({cm['expert_costs'][cm['costlier']]:g}); MoQE minus their interpolation at that cost: "
                f"{diff_text(self.metric, d)}, p = {p_text(d['p_value'])}."]

    def cost_not_applicable(self, cm: dict) -> list[str]:
        return [f"Cost-matched control: not applicable ({cm.get('reason')})."]


def _controls_markdown(rep: dict, metric: str) -> list[str]:
    st = rep.get("strongest_expert")
    if st:
        L = [f"Strongest-preset expert {st['name']}: {METRIC_TITLES[metric]} minus FP "
             f"{diff_text(metric, st['distance_to_fp'])}."]
    else:
        L = ["No strongest-preset expert in this set: the baseline routing must beat is missing."]
    return L + controls_markdown(rep.get("controls") or {}, _ControlsText(metric))


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
