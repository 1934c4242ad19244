"""Compile to an accuracy budget on an image recipe: what the search chooses per budget and cost,
its val and test drop with intervals, its cost, the cheapest hand-picked preset that also meets
the budget on val, and the anchors' point-estimate rule against the interval rule over several
validation draws.

    python bench/budget.py fmnist-cnn --budgets 0.05 0.1 0.3 --costs latency weight_bits --draws 5 \\
        --json bench/results/epyc-2core/budget_fmnist.json
    python bench/budget.py mobilenetv2-demo --fp-agreement --budgets 2 5 10 --draws 5 \
        --json bench/results/epyc-2core/budget_mobilenetv2.json

It runs the build's own search (``moqe_compile.target.search`` with the image plug-in's
candidates, ``tasks/image/budget.py``) once per (cost, budget); a candidate another search
already built is reused, so each search's time is given as the sum of the measured build and
scoring seconds of the candidates it visited. Latency is measured once for every candidate,
interleaved with FP (batch 1 and 32), on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_json_option, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="a shipped image recipe name or a TOML path (e.g. fmnist-cnn)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    ap.add_argument("--costs", nargs="+", default=["latency", "weight_bits"], choices=["latency", "size", "weight_bits"])
    ap.add_argument("--draws", type=int, default=5, help="validation draws for the point-vs-interval comparison")
    ap.add_argument("--search-minutes", type=float, default=30.0)
    ap.add_argument("--work", type=Path, default=Path("budget-bench-work"))
    ap.add_argument("--fp-agreement", action="store_true",
                    help="measure the drop in top-1 agreement with FP even where the images carry labels")
    add_json_option(ap)
    args = ap.parse_args()

    import numpy as np
    import torch

    from moqe_compile import recipes
    from moqe_compile import target as tg
    from moqe_compile.backends import OrtCpuSession
    from moqe_compile.quantize import prepare_for_quantization
    from moqe_compile.tasks.image.budget import ImageBudget, Spec, headline_vector, sensitivity_ranking, tiers
    from moqe_compile.tasks.image.config import load_recipe
    from moqe_compile.tasks.image.data import build_splits
    from moqe_compile.tasks.image.model import load_fp_model
    from moqe_compile.tasks.image.preprocess import Preprocess
    from moqe_compile.tasks.image.score import run_batched
    from moqe_compile.tasks.image.budget import INT8_LADDER, W4A8_LADDER

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    cfg = load_recipe(recipes.path(args.recipe))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    fp = load_fp_model(cfg.model, cfg.preprocessing, work / "fp.onnx")
    splits = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))
    if args.fp_agreement:
        splits = {k: replace(v, labels=None) for k, v in splits.items()}
    prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
    fp_sess = OrtCpuSession("fp", fp.path)
    fp_logits = {s: run_batched(fp_sess, splits[s].x) for s in ("router_train", "router_val", "test")}
    t0 = time.perf_counter()
    ranking = sensitivity_ranking(prepared, fp.input_name, splits["calibration"].x, work)
    sens_s = time.perf_counter() - t0
    val = splits["router_val"]
    budget = ImageBudget(prepared, fp.input_name, splits["calibration"].x, val.x, val.labels, val.sources,
                         fp_logits["router_val"], work, [r["node"] for r in ranking])
    cache: dict = {}
    secs: dict = {}

    def evaluate(spec):
        if spec not in cache:
            t = time.perf_counter()
            cache[spec] = budget.evaluate(spec)
            secs[spec] = time.perf_counter() - t
        return replace(cache[spec], val=dict(cache[spec].val), cost=cache[spec].cost)

    n_layers = len(ranking)
    searches = {}
    for cost in args.costs:
        for b in args.budgets:
            visited = []

            def ev(spec, visited=visited):
                visited.append(spec)
                return evaluate(spec)
            res = tg.search(tiers(cost, n_layers), ev, b, 60 * args.search_minutes)
            searches[(cost, b)] = (res, list(visited))
            print(f"search {cost} {b}: {[c.name for c in res.candidates]}", file=sys.stderr)
    for p in (*INT8_LADDER, *W4A8_LADDER):  # the hand-picked presets, each measured once
        evaluate(Spec(p))
    specs = list(cache)
    cands = [cache[s] for s in specs]
    fp_ms = budget.measure(cands, fp.path, [1, 32])
    # Every candidate on test and on the draw pool (router_train + router_val: not used by the search's
    # calibration; the draws below resample validation sets from it).
    pool_x = np.concatenate([splits["router_train"].x, val.x])
    pool_y = None if val.labels is None else np.concatenate([splits["router_train"].labels, val.labels])
    pool_fp = np.concatenate([fp_logits["router_train"], fp_logits["router_val"]])
    vec = {"test_fp": headline_vector(fp_logits["test"], fp_logits["test"], splits["test"].labels),
           "pool_fp": headline_vector(pool_fp, pool_fp, pool_y)}
    for c in cands:
        sess = OrtCpuSession(c.name, budget.paths[c.name])
        vec[f"test:{c.name}"] = headline_vector(run_batched(sess, splits["test"].x), fp_logits["test"],
                                                splits["test"].labels)
        vec[f"pool:{c.name}"] = headline_vector(run_batched(sess, pool_x), pool_fp, pool_y)
        sess.close()

    def test_drop(name):
        return tg.rate_drop(vec["test_fp"], vec[f"test:{name}"])

    rows = []
    for (cost, b), (res, visited) in searches.items():
        found = [cache[s] for s in dict.fromkeys(visited)]
        for c in found:
            c.meets = tg.meets(c.val["ci95"], b)
        k = tg.choose(found, cost, 1)
        hand = [cache[Spec(p)] for p in (*INT8_LADDER, *W4A8_LADDER)]
        for c in hand:
            c.meets = tg.meets(c.val["ci95"], b)
        hk = tg.choose(hand, cost, 1)
        row = {"cost": cost, "max_drop": b, "visited": [c.name for c in found],
               "search_seconds": round(sum(secs[s] for s in dict.fromkeys(visited)), 1),
               "chosen": None if k is None else found[k].name,
               "hand_picked": None if hk is None else hand[hk].name}
        for key, idx, lst in (("chosen", k, found), ("hand_picked", hk, hand)):
            if idx is not None:
                c = lst[idx]
                row[f"{key}_val"] = c.val
                row[f"{key}_test"] = test_drop(c.name)
                row[f"{key}_cost"] = {"mean_weight_bits": c.cost["mean_weight_bits"], "bytes": c.cost["bytes"],
                                      "latency_ms": c.cost["latency_ms"], "slower_than_fp": c.slower_than_fp}
        rows.append(row)
        print(row, file=sys.stderr)

    # The anchors' rule vs ours, on the same candidates, over validation draws of the same size.
    rng_n = len(val.x)
    draws = []
    for d in range(args.draws):
        idx = np.random.default_rng(1000 + d).choice(len(pool_x), rng_n, replace=False)
        for cost in args.costs:
            for b in args.budgets:
                scored = []
                for c in cands:
                    v = tg.rate_drop(vec["pool_fp"][idx], vec[f"pool:{c.name}"][idx])
                    scored.append(replace(c, val=v))
                out = {"draw": d, "cost": cost, "max_drop": b}
                for rule in ("point", "interval"):
                    for c in scored:
                        c.meets = tg.meets_point(c.val["drop"], b) if rule == "point" else tg.meets(c.val["ci95"], b)
                    k = tg.choose(scored, cost, 1)
                    if k is None:
                        out[rule] = None
                        continue
                    te = test_drop(scored[k].name)
                    out[rule] = {"chosen": scored[k].name, "val_drop": scored[k].val["drop"], "test": te,
                                 "broke_on_test": te["drop"] > b}
                draws.append(out)
    summary = {}
    for cost in args.costs:
        for b in args.budgets:
            sel = [x for x in draws if x["cost"] == cost and x["max_drop"] == b]
            summary[f"{cost}@{b}"] = {r: {"chosen_in": sum(x[r] is not None for x in sel),
                                          "broke_on_test": sum(bool(x[r] and x[r]["broke_on_test"]) for x in sel)}
                                      for r in ("point", "interval")}
    out = {"recipe": args.recipe, "fp_latency_ms": fp_ms, "sensitivity_seconds": round(sens_s, 1),
           "n_val": int(len(val.x)), "n_test": int(len(splits["test"].x)), "rows": rows,
           "candidates": [{**asdict(c), "test": test_drop(c.name), "build_and_score_seconds": round(secs[s], 1)}
                          for s, c in zip(specs, cands)],
           "draws": draws, "draw_summary": summary, "total_seconds": round(time.perf_counter() - t_all, 1)}
    print_table(out)
    write_json(args.json, out)
    return 0


def print_table(out: dict) -> None:
    def iv(d):
        return f"{d['drop']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]" if d else "-"

    print(f"FP latency: {out['fp_latency_ms']} ms; n val {out['n_val']}, n test {out['n_test']}")
    print("| cost | max_drop | chosen | val drop [95% CI] | test drop [95% CI] | bits | b1 ms | b32 ms | "
          "hand-picked preset | its val drop | its bits / b1 ms | search s (candidates) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        c, h = r.get("chosen_cost"), r.get("hand_picked_cost")
        print(f"| {r['cost']} | {r['max_drop']} | {r['chosen']} | {iv(r.get('chosen_val'))} | "
              f"{iv(r.get('chosen_test'))} | {c['mean_weight_bits']:.2f} | {c['latency_ms']['1']:.3f} | "
              f"{c['latency_ms']['32']:.3f} | {r['hand_picked']} | {iv(r.get('hand_picked_val'))} | "
              + (f"{h['mean_weight_bits']:.2f} / {h['latency_ms']['1']:.3f}" if h else "-")
              + f" | {r['search_seconds']} ({len(r['visited'])}) |" if c else
              f"| {r['cost']} | {r['max_drop']} | none | | | | | | {r['hand_picked']} | | | {r['search_seconds']} |")
    print("\npoint-estimate rule vs interval rule over validation draws (chosen in / broke the budget on test):")
    for k, v in out["draw_summary"].items():
        print(f"  {k}: point {v['point']['chosen_in']}/{v['point']['broke_on_test']}, "
              f"interval {v['interval']['chosen_in']}/{v['interval']['broke_on_test']}")


if __name__ == "__main__":
    sys.exit(main())
