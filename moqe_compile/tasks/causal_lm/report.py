"""Perplexity reports of a causal-LM bundle: FP, each expert, the oracle and MoQE, per corpus,
with bootstrap 95% intervals and a paired test of MoQE against the best single expert
(chosen on router_val, never on test).

Every window has the same length, so corpus perplexity = exp(mean over windows of the mean
token NLL); intervals resample windows (paired across rows) and are mapped through exp.
"""

from __future__ import annotations

import numpy as np

from moqe_compile.evaluate.controls import (copies_entries, copies_summary, cost_matched, interpolate,
                                            random_route)
from moqe_compile.evaluate.report import ControlsText, controls_markdown
from moqe_compile.evaluate.stats import bootstrap_means, paired_bootstrap, percentile_interval
from moqe_compile.gate import Comparison, decide


def _ppl(v: np.ndarray, boot: np.ndarray) -> dict:
    lo, hi = percentile_interval(boot)
    return {"ppl": float(np.exp(v.mean())), "ppl_ci95": [float(np.exp(lo)), float(np.exp(hi))],
            "mean_nll": float(v.mean())}


def lm_split_report(fp_nll: np.ndarray, loss: np.ndarray, names: list[str], route: np.ndarray, best: int,
                    corpus: np.ndarray, kl: np.ndarray | None = None, agree: np.ndarray | None = None,
                    n_boot: int = 10_000, seed: int = 0, *, mix: np.ndarray | None = None,
                    copies: dict | None = None, costs: dict | None = None, val_loss: dict | None = None,
                    corpus_choice: dict[str, int] | None = None) -> dict:
    """One split: overall and per corpus.

    Controls (docs/design.md#controls-and-the-gate), each a per-window NLL vector resampled with
    the rest: ``random_router`` (MoQE's own usage shuffled across windows), ``mix`` (the
    output-averaging mixture, runs every expert), ``copies`` (``{"names", "best", "loss": (N, Kc), "route": (N,) | None, "of"}``: K
    copies of one recipe on disjoint calibration parts, their oracle and a router trained on them)
    and, when experts differ in weight bits (``costs``), single experts at MoQE's expected cost
    (brackets chosen by ``val_loss``, never on this split). Two controls say what the router is
    worth beyond knowing the kind of text: the ``true_corpus`` router sends each window to the
    expert ``corpus_choice`` names for its corpus (chosen on router_val: what a service that
    knows its traffic's domain does without a router), and the ``corpus_oracle`` sends it to
    the expert best on its corpus in this split (an oracle: it looks at this split's losses)."""
    def sub(m):
        if copies is None:
            return None
        return {**copies, "loss": np.asarray(copies["loss"])[m],
                "route": None if copies.get("route") is None else np.asarray(copies["route"])[m]}

    by_corpus = _corpus_routes(loss, corpus, corpus_choice)
    ctl = dict(mix=mix, costs=costs, val_loss=val_loss)
    out = {"n": int(len(fp_nll)), "best_expert": names[best],
           "overall": _block(fp_nll, loss, names, route, best, kl, agree, n_boot, seed, copies=copies,
                             by_corpus=by_corpus, **ctl)}
    labels = sorted(set(corpus.tolist()))
    if len(labels) > 1:
        out["per_corpus"] = {}
        for c in labels:
            m = corpus == c
            out["per_corpus"][c] = _block(fp_nll[m], loss[m], names, route[m], best,
                                          None if kl is None else kl[m], None if agree is None else agree[m],
                                          n_boot, seed, copies=sub(m), by_corpus={k: v[m] for k, v in by_corpus.items()},
                                          **{**ctl, "mix": None if mix is None else mix[m]})
    return out


def corpus_choice_on(loss: np.ndarray, corpus: np.ndarray) -> dict[str, int]:
    """Per corpus, the expert with the lowest mean loss on these windows (pass router_val's)."""
    return {c: int(loss[corpus == c].mean(0).argmin()) for c in sorted(set(corpus.tolist()))}


def _corpus_routes(loss: np.ndarray, corpus: np.ndarray, choice: dict[str, int] | None) -> dict[str, np.ndarray]:
    """Per-window routes of the two corpus controls (only where there is more than one corpus)."""
    if len(set(corpus.tolist())) < 2:
        return {}
    own = corpus_choice_on(loss, corpus)
    out = {"corpus_oracle": np.array([own[c] for c in corpus])}
    if choice is not None and set(own) <= set(choice):
        out["true_corpus"] = np.array([choice[c] for c in corpus])
    return out


def _diff(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict:
    t = paired_bootstrap(a, b, n_boot, seed)
    t["ppl_ratio"] = float(np.exp(t["diff"]))  # exp of a mean-NLL difference = perplexity ratio
    return t


def _controls(loss, names, route, best, n_boot, seed, mix, copies, costs, val_loss, by_corpus=None) -> dict:
    idx = np.arange(len(loss))
    best_v = loss[:, best]

    def ppl(v: np.ndarray) -> dict:
        return _ppl(v, bootstrap_means(v, n_boot, seed))

    rand = loss[idx, random_route(route, seed)]
    out = {"random_router": {**ppl(rand), "vs_best": _diff(rand, best_v, n_boot, seed)}}
    for key, r in (by_corpus or {}).items():
        v = loss[idx, r]
        out[key] = {**ppl(v), "vs_best": _diff(v, best_v, n_boot, seed),
                    "moqe_vs_this": _diff(loss[idx, route], v, n_boot, seed),
                    "usage": {name: float((r == j).mean()) for j, name in enumerate(names)}}
    if mix is not None:
        out["mixture"] = {**ppl(mix), "cost_experts_run": len(names), "vs_best": _diff(mix, best_v, n_boot, seed)}
    out["copies_oracle"] = None
    if copies is not None:
        cl = np.asarray(copies["loss"], np.float64)
        vec = copies_entries(copies, lambda choice: cl[idx, choice])
        best_copy = vec[f"copy:{copies['names'][int(copies['best'])]}"]
        co = copies_summary({**copies, "best": int(copies["best"])}, "of", lambda k: ppl(vec[k]),
                            _diff(vec["copies_oracle"], best_copy, n_boot, seed))
        if "copies_router" in vec:
            cr = vec["copies_router"]
            co["router"] = {**ppl(cr), "vs_best_copy": _diff(cr, best_copy, n_boot, seed)}
            co["moqe_vs_copies"] = {**_diff(loss[idx, route] - best_v, cr - best_copy, n_boot, seed),
                                    "meaning": "(MoQE - best single) - (copies router - best copy), mean token "
                                               "NLL per window; negative = MoQE gains more than calibration noise"}
        out["copies_oracle"] = co
    cm = cost_matched(names, costs, route, val_loss, unit="weight bits", unit_name="weight bits")
    if cm["applicable"]:
        matched = interpolate(cm, lambda n: loss[:, names.index(n)])
        cm["moqe_minus_interpolated"] = _diff(loss[idx, route], matched, n_boot, seed)
    out["cost_matched"] = cm
    return out


def _block(fp_nll, loss, names, route, best, kl, agree, n_boot, seed, *, mix=None, copies=None, costs=None,
           val_loss=None, by_corpus=None) -> dict:
    n = len(fp_nll)
    idx = np.arange(n)
    routed = loss[idx, route]
    oracle = loss.min(1)
    rows = np.vstack([fp_nll, loss.T, oracle, routed])  # (m, n), resampled together: paired intervals
    boot = bootstrap_means(rows, n_boot, seed)
    res = {"n": int(n), "fp": _ppl(fp_nll, boot[:, 0]), "experts": {}, "oracle": _ppl(oracle, boot[:, -2]),
           "moqe": _ppl(routed, boot[:, -1])}
    for j, name in enumerate(names):
        res["experts"][name] = _ppl(loss[:, j], boot[:, 1 + j])
        if kl is not None:
            res["experts"][name]["kl_to_fp"] = float(kl[:, j].mean())
        if agree is not None:
            res["experts"][name]["fp_top1_agreement"] = float(agree[:, j].mean())
    res["moqe_vs_best"] = paired_bootstrap(routed, loss[:, best], n_boot, seed)
    head = float(loss[:, best].mean() - oracle.mean())
    res["moqe_vs_best"]["headroom_captured"] = (float(loss[:, best].mean() - routed.mean()) / head) if head > 0 else None
    res["usage"] = {name: float((route == j).mean()) for j, name in enumerate(names)}
    res["oracle_usage"] = {name: float((loss.argmin(1) == j).mean()) for j, name in enumerate(names)}
    res["router_accuracy"] = float((route == loss.argmin(1)).mean())
    res["controls"] = _controls(loss, names, route, best, n_boot, seed, mix, copies, costs, val_loss, by_corpus)
    return res


def _ppl_cells(r: dict) -> str:
    return f"{r['ppl']:.3f} | [{r['ppl_ci95'][0]:.3f}, {r['ppl_ci95'][1]:.3f}]"


def _test_text(t: dict) -> str:
    return f"{t['diff']:+.4f} [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}], p = {t['p_value']:.3g}"


def _row(label: str, r: dict, test: dict, against: str = "") -> list[str]:
    return [f"| {label} | {_ppl_cells(r)} | {against}{_test_text(test)} |"]


class _ControlsText(ControlsText):
    def random_router(self, r: dict) -> list[str]:
        return _row("random router (MoQE's usage, shuffled)", r, r["vs_best"])

    def mixture(self, m: dict) -> list[str]:
        return _row(f"output-averaging mixture (runs all {m['cost_experts_run']} experts)", m, m["vs_best"])

    def corpus_route(self, key: str, r: dict) -> list[str]:
        label = {"true_corpus": "true-corpus router (each window to its corpus's best expert on router_val)",
                 "corpus_oracle": "per-corpus oracle (each window to its corpus's best expert on this split)"}[key]
        return [f"| {label} | {_ppl_cells(r)} | {_test_text(r['vs_best'])}; MoQE − this: {_test_text(r['moqe_vs_this'])} |"]

    def copies(self, co: dict) -> list[str]:
        return _row(f"oracle of {co['copies']} copies of {co['of']}", co, co["oracle_gain"], "vs best copy: ")

    def copies_router(self, co: dict) -> list[str]:
        r = co["router"]
        return (_row("router trained on the copies", r, r["vs_best_copy"], "vs best copy: ")
                + [f"\nMoQE's gain minus the copies router's gain: {_test_text(co['moqe_vs_copies'])}"])

    def no_copies(self) -> list[str]:
        return ["\nNo copies control (none built, or the data are not the build's stored splits)."]

    def cost_matched(self, cm: dict) -> list[str]:
        return [f"Cost-matched: MoQE at {cm['moqe_expected_cost']:.2f} expected weight bits − {cm['cheaper']} / "
                f"{cm['costlier']} interpolated: {_test_text(cm['moqe_minus_interpolated'])}"]

    def cost_not_applicable(self, cm: dict) -> list[str]:
        return [f"Cost-matched: not applicable ({cm['reason']})."]


def _controls_markdown(ctl: dict) -> list[str]:
    if not ctl:
        return []
    return (["", "| control | perplexity | 95% CI | − best single (mean NLL) [95% CI], p |", "|---|---:|---|---|"]
            + controls_markdown(ctl, _ControlsText()))


def render_lm_markdown(report: dict, title: str = "") -> str:
    lines = [f"## {title}" if title else ""]
    blocks = [("all", report["overall"])] + list(report.get("per_corpus", {}).items())
    for name, b in blocks:
        lines.append(f"\n**{name}** (n = {b['n']} windows; best single expert on router_val: {report['best_expert']})\n")
        lines.append("| model | perplexity | 95% CI | KL to FP | FP top-1 agree | usage (router / oracle) |")
        lines.append("|---|---:|---|---:|---:|---|")
        fmt = _ppl_cells
        lines.append(f"| FP | {fmt(b['fp'])} | 0 | 1 | |")
        for e, r in b["experts"].items():
            kl = f"{r['kl_to_fp']:.4g}" if "kl_to_fp" in r else ""
            ag = f"{r['fp_top1_agreement']:.4f}" if "fp_top1_agreement" in r else ""
            lines.append(f"| {e} | {fmt(r)} | {kl} | {ag} | {b['usage'][e]:.2f} / {b['oracle_usage'][e]:.2f} |")
        lines.append(f"| oracle | {fmt(b['oracle'])} | | | |")
        lines.append(f"| MoQE | {fmt(b['moqe'])} | | | |")
        t = b["moqe_vs_best"]
        cap = "n/a" if t["headroom_captured"] is None else f"{t['headroom_captured']:.2f}"
        lines.append(f"\nMoQE − best (mean token NLL): {t['diff']:+.4f} [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}], "
                     f"paired bootstrap p = {t['p_value']:.3g}; oracle headroom captured {cap}; "
                     f"router = oracle on {b['router_accuracy']:.2f} of windows")
        lines += _controls_markdown(b.get("controls") or {})
    return "\n".join(lines)


def gate_decision(val: dict, alpha: float, force: bool) -> dict:
    """``router.gate`` from the router_val split report (:func:`moqe_compile.gate.decide`).

    The metric is mean token NLL (lower is better), so the gains are negated differences; the
    copies bar is the copies router's gain over the best copy, else the copies oracle's
    headroom. ``test`` keeps the whole paired test of MoQE vs the best single expert."""
    o = val["overall"]
    t = o["moqe_vs_best"]
    co = (o.get("controls") or {}).get("copies_oracle")
    copies_gain = kind = None
    if co and co.get("router"):
        copies_gain, kind = -float(co["router"]["vs_best_copy"]["diff"]), "copies router"
    elif co:
        copies_gain, kind = -float(co["oracle_gain"]["diff"]), "copies oracle headroom"
    best = Comparison(val["best_expert"], -float(t["diff"]), float(t["p_value"]))
    return {**decide(best, alpha, force, "mean_nll", copies_gain, kind), "test": t}
