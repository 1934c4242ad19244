"""Perplexity reports of a causal-LM bundle: FP, each expert, the oracle and MoQE, per corpus,
with bootstrap 95% intervals and a paired test of MoQE against the best single expert
(chosen on router_val, never on test).

Every window has the same length, so corpus perplexity = exp(mean over windows of the mean
token NLL); intervals resample windows (paired across rows) and are mapped through exp.
"""

from __future__ import annotations

import numpy as np

from .stats import bootstrap_means, paired_bootstrap, percentile_interval


def _ppl(v: np.ndarray, boot: np.ndarray) -> dict:
    lo, hi = percentile_interval(boot)
    return {"ppl": float(np.exp(v.mean())), "ppl_ci95": [float(np.exp(lo)), float(np.exp(hi))],
            "mean_nll": float(v.mean())}


def lm_split_report(fp_nll: np.ndarray, loss: np.ndarray, names: list[str], route: np.ndarray, best: int,
                    corpus: np.ndarray, kl: np.ndarray | None = None, agree: np.ndarray | None = None,
                    n_boot: int = 10_000, seed: int = 0) -> dict:
    """One split: overall and per corpus."""
    out = {"n": int(len(fp_nll)), "best_expert": names[best], "overall": _block(fp_nll, loss, names, route, best,
                                                                                kl, agree, n_boot, seed)}
    labels = sorted(set(corpus.tolist()))
    if len(labels) > 1:
        out["per_corpus"] = {}
        for c in labels:
            m = corpus == c
            out["per_corpus"][c] = _block(fp_nll[m], loss[m], names, route[m], best,
                                          None if kl is None else kl[m], None if agree is None else agree[m],
                                          n_boot, seed)
    return out


def _block(fp_nll, loss, names, route, best, kl, agree, n_boot, seed) -> dict:
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
    return res


def render_lm_markdown(report: dict, title: str = "") -> str:
    lines = [f"## {title}" if title else ""]
    blocks = [("all", report["overall"])] + list(report.get("per_corpus", {}).items())
    for name, b in blocks:
        lines.append(f"\n**{name}** (n = {b['n']} windows; best single expert on router_val: {report['best_expert']})\n")
        lines.append("| model | perplexity | 95% CI | KL to FP | FP top-1 agree | usage (router / oracle) |")
        lines.append("|---|---:|---|---:|---:|---|")
        fmt = lambda r: f"{r['ppl']:.3f} | [{r['ppl_ci95'][0]:.3f}, {r['ppl_ci95'][1]:.3f}]"  # noqa: E731
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
    return "\n".join(lines)
