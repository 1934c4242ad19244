"""Choose ``[router] cost_weight`` for the W2A8 layer-group experts on router_val only.

    python bench/studies/fashion_mnist/w2a8_cost.py WORK/w2a8-groups \\
        --weights 0 0.001 0.003 0.01 0.03 0.1 --json bench/results/epyc-2core/fmnist-w2a8-cost-sweep.json

(``w2a8_cost.sh`` builds ``WORK/w2a8-groups`` and runs this.) Takes a bundle built from
``moqe_compile/recipes/fmnist-w2a8-groups.toml`` (its experts, FP model and build
config), rebuilds its router_train / router_val splits, scores its experts on them, and for
each cost weight trains, exports and routes the bundle's router exactly as ``build`` does
(the build: each expert's loss charged ``cost_weight`` per mean weight bit above the
cheapest expert in training, epoch choice and fallback; routed through the exported ONNX
graph and the confidence fallback). Only router_val is looked at; the test split is never
loaded.

Selection rule (fixed before any test figure was seen): the cost weight whose router has the
largest **val cost-matched gain** -- MoQE's val top-1 minus the single experts that bracket its
val expected cost (mean weight bits; best on each side by val loss), interpolated linearly at
that cost (``controls.cost_matched`` of the val report). Ties (equal to 1e-9) go to the larger
weight (the cheaper router). The val figures are optimistic for every candidate alike: router_val
also chose each router's epoch and fallback threshold.

A second, stricter cost control is reported beside it (added after the sweep had run on val,
before any test figure; it chose nothing): ``frontier_matched``, MoQE minus the best *random mix
of at most two single experts* whose expected cost is at most MoQE's (the upper envelope of the
single experts' (cost, val loss) points, so experts are ranked by val loss as in
``cost_matched``). ``cost_matched`` interpolates between the best expert on each side of the
cost, which can skip a near-equal-cost expert: at 2.010 bits it mixes w2-all (2.000) with
w2-hp-stage1 (4.27) and ignores w2-hp-stem (2.011). ``--frontier BUNDLE`` computes both on a
built bundle's router_val and test splits (the routes of its deployed router).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from moqe_compile.backends import OrtCpuSession
from moqe_compile.bundle import read_bundle
from moqe_compile.tasks.image.config import BuildConfig
from moqe_compile.tasks.image.data import build_splits
from moqe_compile.tasks.image.preprocess import Preprocess
from moqe_compile.tasks.image.eval import load_eval_data
from moqe_compile.tasks.image.report import build_split_report
from moqe_compile.evaluate.stats import paired_bootstrap, paired_compare
from moqe_compile.tasks.image.router_export import export_router
from moqe_compile.router.fallback import apply_fallback, choose_fallback
from moqe_compile.tasks.image.router import train_router
from moqe_compile.tasks.image.score import run_batched, score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402

RULE = ("largest val cost-matched gain (MoQE val top-1 minus the interpolation, at MoQE's val expected mean "
        "weight bits, of the best single experts by val loss at or below and at or above that cost); ties to the "
        "larger cost_weight; chosen on router_val only, before the test split was evaluated")


def log(msg: str) -> None:
    print(f"[cost-sweep] {msg}", file=sys.stderr, flush=True)


def frontier_mix(costs: np.ndarray, val_loss: np.ndarray, budget: float) -> tuple[int, int, float]:
    """The random mix of at most two single experts, expected cost <= ``budget``, with the lowest
    val loss: (cheaper index, costlier index, share of the cheaper). Two experts suffice (one cost
    constraint); a single expert is (k, k, 1.0)."""
    best, arg = np.inf, None
    for i in range(len(costs)):
        for j in range(len(costs)):
            if costs[i] > budget + 1e-12 or costs[i] > costs[j]:
                continue
            # the costlier expert's share is as large as the budget allows
            w = 1.0 if costs[j] <= budget or costs[j] == costs[i] else (costs[j] - budget) / (costs[j] - costs[i])
            loss = w * val_loss[i] + (1 - w) * val_loss[j]
            if loss < best - 1e-15:
                best, arg = loss, (i, j, float(w))
    return arg


def frontier_matched(names: list[str], costs: np.ndarray, val_loss: np.ndarray, route: np.ndarray,
                     correct: np.ndarray) -> dict:
    """MoQE top-1 minus the frontier mix at MoQE's expected cost, per sample, paired bootstrap.
    ``correct``: (N, K) 0/1 top-1 of every expert; ``route``: (N,) MoQE's expert per sample."""
    n = len(route)
    expected = float(np.bincount(route, minlength=len(names)) @ costs / n)
    i, j, w = frontier_mix(costs, val_loss, expected)
    moqe = correct[np.arange(n), route].astype(float)
    mix = w * correct[:, i] + (1 - w) * correct[:, j]
    pb = paired_bootstrap(moqe, mix)
    return {"moqe_expected_cost": expected, "cheaper": names[i], "costlier": names[j], "share_cheaper": w,
            "mix_cost": float(w * costs[i] + (1 - w) * costs[j]), "moqe_top1": float(moqe.mean()),
            "frontier_top1": float(mix.mean()),
            "moqe_minus_frontier": {"metric": "top1", "diff": pb["diff"], "ci95": pb["ci95"],
                                    "p_value": pb["p_value"], "test": pb["test"]}}


def route_val(cfg: BuildConfig, w: float, splits, tr, va, costs: np.ndarray, work: Path) -> tuple[np.ndarray, dict]:
    """The val route of the router ``build`` would ship with ``cost_weight = w``."""
    rc = replace(cfg.router, cost_weight=w)
    pen = rc.cost_weight * (costs - costs.min())
    tr_loss, va_loss = tr.loss + pen, va.loss + pen
    res = train_router(rc, splits["router_train"].x, tr_loss, splits["router_val"].x, va_loss)
    path = work / f"router-{w:g}.onnx"
    export_router(res.model, rc.input_size, cfg.preprocessing.crop, path, work / f"router-{w:g}.safetensors",
                  channels=cfg.preprocessing.channels, mode=rc.downsample, quantize=rc.quantize,
                  calib_x=splits["router_train"].x)
    sess = OrtCpuSession("router", path, 1)
    probs = run_batched(sess, splits["router_val"].x)
    fb = (choose_fallback(probs, va_loss) if rc.fallback
          else {"threshold": 0.0, "expert": int(va_loss.mean(0).argmin())})
    route = apply_fallback(probs, fb["threshold"], fb["expert"])[0]
    return route, {"best_epoch": res.best_epoch, "fallback": fb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="a bundle built from the fmnist-w2a8-groups recipe")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.001, 0.003, 0.01, 0.03, 0.1])
    ap.add_argument("--frontier", action="store_true",
                    help="no sweep: the frontier-matched control of the bundle's deployed router on router_val and test")
    add_json_option(ap)
    args = ap.parse_args(argv)
    if args.frontier:
        return frontier_report(args.bundle, args.json)

    man = read_bundle(args.bundle).manifest
    cfg = BuildConfig.from_manifest(man["build_config"])
    names = [e["name"] for e in man["experts"]]
    costs = np.array([e["cost"]["mean_weight_bits"] for e in man["experts"]])
    log("rebuilding the splits (router_train, router_val only are used)")
    splits = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))
    fp = OrtCpuSession("fp", args.bundle / man["model"]["fp"]["path"])
    ex = [OrtCpuSession(e["name"], args.bundle / e["variants"]["onnxruntime-cpu"]["path"]) for e in man["experts"]]
    log("scoring the experts on router_train and router_val")
    tr = score(fp, ex, splits["router_train"].x, splits["router_train"].labels, cfg.data.targets)
    va = score(fp, ex, splits["router_val"].x, splits["router_val"].labels, cfg.data.targets)
    with np.load(args.bundle / man["report"]["loss_matrix"]["path"]) as z:
        same = bool(np.allclose(z["router_val_loss"], va.loss, atol=1e-5))
    log(f"val losses equal the bundle's loss matrix: {same}")
    val_loss = {n: float(v) for n, v in zip(names, va.loss.mean(0))}
    best_k = int(va.loss.mean(0).argmin())
    rows = []
    with tempfile.TemporaryDirectory(prefix="cost-sweep-") as work:
        for w in args.weights:
            log(f"cost_weight = {w:g}: training the router")
            route, info = route_val(cfg, w, splits, tr, va, costs, Path(work))
            rep = build_split_report(
                fp_logits=va.fp_logits, expert_logits=va.expert_logits, expert_names=names,
                labels=splits["router_val"].labels, loss=va.loss, route=route, best_expert=best_k,
                targets=cfg.data.targets, split="router_val", expert_costs=dict(zip(names, costs.tolist())),
                expert_val_loss=val_loss)
            cm = rep["controls"]["cost_matched"]
            correct = (va.expert_logits.argmax(-1).T == splits["router_val"].labels[:, None]).astype(float)
            fm_ = frontier_matched(names, costs, va.loss.mean(0), route, correct)
            usage = np.bincount(route, minlength=len(names)) / len(route)
            row = {"cost_weight": w, "moqe_top1": rep["moqe"]["top1"]["value"],
                   "best_single": rep["best_expert"]["name"], "best_single_top1": rep["best_expert"]["top1"]["value"],
                   "moqe_vs_best": rep["moqe_vs_best"], "expected_mean_weight_bits": cm["moqe_expected_cost"],
                   "usage": dict(zip(names, usage.round(4).tolist())),
                   "cost_matched": {k: cm.get(k) for k in ("cheaper", "costlier", "weight_cheaper",
                                                           "moqe_minus_interpolated")},
                   "frontier_matched": fm_, **info}
            rows.append(row)
            d = cm["moqe_minus_interpolated"]
            f = fm_["moqe_minus_frontier"]
            log(f"  val top-1 {100 * row['moqe_top1']:.2f} at {row['expected_mean_weight_bits']:.3f} bits; "
                f"cost-matched {100 * d['diff']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]; "
                f"frontier {100 * f['diff']:+.2f} [{100 * f['ci95'][0]:+.2f}, {100 * f['ci95'][1]:+.2f}]; "
                f"vs best single {100 * rep['moqe_vs_best']['diff']:+.2f} (p = {rep['moqe_vs_best']['p_value']:.3g})")
    gains = np.array([r["cost_matched"]["moqe_minus_interpolated"]["diff"] for r in rows])
    ws = np.array([r["cost_weight"] for r in rows])
    top = np.flatnonzero(gains >= gains.max() - 1e-9)
    chosen = float(ws[top].max())
    log(f"chosen on router_val: cost_weight = {chosen:g}")
    out = {"bundle": str(args.bundle), "split": "router_val", "n": int(len(va.loss)), "rule": RULE,
           "expert_costs": dict(zip(names, costs.tolist())), "expert_val_loss": val_loss,
           "val_losses_match_bundle": same, "candidates": rows, "chosen_cost_weight": chosen}
    write_json(args.json, out)
    print(json.dumps({"chosen_cost_weight": chosen}))
    return 0


def frontier_report(bundle: Path, out_json: Path | None) -> int:
    """``frontier_matched`` (and the expert top-1s it uses) of a built bundle's deployed router
    on its stored eval splits; the experts' val losses are the build's (``report.expert_val_loss``)."""
    from moqe_compile import Runtime

    man = read_bundle(bundle).manifest
    names = [e["name"] for e in man["experts"]]
    costs = np.array([e["cost"]["mean_weight_bits"] for e in man["experts"]])
    val_loss = np.array([man["report"]["expert_val_loss"][n] for n in names])
    sessions = [OrtCpuSession(e["name"], bundle / e["variants"]["onnxruntime-cpu"]["path"]) for e in man["experts"]]
    out = {"bundle": str(bundle), "gate": man["router"]["gate"], "expert_costs": dict(zip(names, costs.tolist())),
           "expert_val_loss": dict(zip(names, val_loss.tolist())), "splits": {}}
    with Runtime.load(bundle) as rt:
        for s in man["report"]["eval_data"]["splits"]:
            x, y, _ = load_eval_data(bundle / man["report"]["eval_data"]["path"], s)
            correct = np.stack([run_batched(sess, x).argmax(-1) == y for sess in sessions], 1).astype(float)
            route = np.concatenate([rt.run(x[i : i + 256]).expert_index for i in range(0, len(x), 256)])
            f = frontier_matched(names, costs, val_loss, route, correct)
            moqe = correct[np.arange(len(y)), route]
            out["splits"][s] = {"n": int(len(y)), "expert_top1": dict(zip(names, correct.mean(0).tolist())),
                                "usage": dict(zip(names, (np.bincount(route, minlength=len(names)) / len(route))
                                                  .round(4).tolist())), **f,
                                # MoQE against every single expert, whatever its cost (paired, McNemar)
                                "moqe_vs_each_expert": {n: {k: v for k, v in paired_compare(moqe, correct[:, k]).items()
                                                            if k in ("diff", "ci95", "p_value", "test", "discordant")}
                                                        for k, n in enumerate(names)}}
            d = f["moqe_minus_frontier"]
            log(f"{s}: MoQE {100 * f['moqe_top1']:.2f} at {f['moqe_expected_cost']:.3f} bits; frontier mix "
                f"{f['cheaper']}/{f['costlier']} {100 * f['frontier_top1']:.2f}; diff {100 * d['diff']:+.2f} "
                f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}], p = {d['p_value']:.3g}")
    write_json(out_json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
