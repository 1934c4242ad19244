"""Held-out perplexity vs average expert bits for each expert-wise bit allocation of
``moe-expert-bits`` (tasks/causal_lm/moe_bits.py), with paired intervals against uniform and random
allocation, plus model size; on the MoE LM bench/moe_train.py trains.

    nice -n 10 python bench/moe_train.py                   # once: trains and caches the quick model
    nice -n 10 python bench/moe_bits.py --work WORK --json bench/results/epyc-2core/moe-bits.json
    nice -n 10 python bench/moe_bits.py --onnx --work WORK --json bench/results/epyc-2core/moe-bits-onnx.json

    # the converged model (bench/moe_train.py --preset converge; hours, resumable):
    nice -n 10 python bench/moe_bits.py --model ~/.cache/moqe-compile/moe-mixtral-converged \
        --widths 1,2,3 --averages 1.5,2,2.5 --work WORK-123 --json bench/results/epyc-2core/moe-bits-converged-123.json

``--model DIR`` is any bench/moe_train.py output directory; with ``--onnx`` the recipe's widths
and allocations are built on that model (its ``heldout.txt`` as the corpus).

``--work DIR`` keeps what a rerun can resume from: ``nll-cache.npz`` (the per-window NLL of every
allocation evaluated so far) and, with ``--onnx``, the built ``bundle/``; without it they live
in a temporary folder for one run.

**Fake-quant grid** (default): widths {2, 3, 4}, averages 2.5 / 3 / 3.5, every routed expert matrix
fake-quantized in torch with the LM quantizers (``--methods``: ``gptq-asym`` = quantize/lm_gptq.py
with a zero point per group of 32 (the GPTQ paper's default), Hessians of the tokens routed to
each expert on the calibration windows; ``rtn-asym`` = quantize/nbits.py's blockwise RTN with a
zero point, groups of 32; ``gptq`` / ``rtn``: symmetric, 2^b − 1 levels); attention,
embeddings and the gates stay FP (the allocation is the only thing that differs between rows).
Allocations: ``combined`` (the paper), ``gate-norm``, ``maxvar``, the controls ``frequency``,
``uniform`` (at a fractional average every expert's output rows are split between the two widths
around it) and ``random`` (``--random-seeds`` permutations). Perplexity on the test windows
(documents never trained on) of wiki / c4 / tiny, per-window mean token NLL; paired bootstrap over
windows against uniform, and against random with windows *and* seeds resampled (the random
control's own spread); a positive difference = the allocation's NLL is lower. The rows
``gate-norm`` (router change alone), ``maxvar`` (variance alone) and ``frequency`` (usage alone)
are the per-criterion ablation of ``combined``. ``criteria`` in the JSON: every expert's score
under each criterion and its Spearman rank correlation, per layer, with the expert's share of the
picks on the test windows.

**ONNX grid** (``--onnx``): builds ``moqe_compile/recipes/moe-mixtral-8x4m.toml`` (widths {4, 8} at 5 bits:
combined, random x 3, frequency; uniform 4 and 8 as brackets; MatMulNBits on ONNX Runtime CPU,
attention and head at 4 bits, gates FP) with the compiler and compares the experts' per-window
test losses from the bundle's loss matrix, same statistics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py, moe_train.py
from common import add_json_option, write_json  # noqa: E402

ALLOCS = ("combined", "gate-norm", "maxvar", "frequency", "uniform")
METHODS = {"gptq-asym": ("gptq", False), "gptq": ("gptq", True), "rtn-asym": ("rtn", False), "rtn": ("rtn", True)}


def hier_bootstrap(paper: np.ndarray, controls: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> dict:
    """mean over windows of (mean over control seeds − paper), resampling windows and seeds.
    ``paper`` (n,), ``controls`` (S, n). Two-sided p from the null-centred bootstrap."""
    from moqe_compile.evaluate.stats import bootstrap_p_value, percentile_interval

    rng = np.random.default_rng(seed)
    S, n = controls.shape
    d_obs = float(controls.mean() - paper.mean())
    res = np.empty(n_boot)
    for b in range(n_boot):
        w = rng.integers(0, n, n)
        s = rng.integers(0, S, S)
        res[b] = controls[np.ix_(s, w)].mean() - paper[w].mean()
    return {"diff": d_obs, "ci95": list(percentile_interval(res)), "p_value": bootstrap_p_value(d_obs, res),
            "test": "bootstrap over windows and random seeds", "n": int(n), "seeds": int(S)}


def window_nll(model, ids: np.ndarray, batch: int = 16) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(ids), batch):
            x = torch.from_numpy(ids[s : s + batch])
            lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
            out.append(-lp.gather(-1, x[:, 1:, None])[..., 0].mean(1).double().numpy())
    return np.concatenate(out)


def fake_quant_grid(args) -> dict:
    import torch

    import moe_train
    from moqe_compile.tasks.causal_lm.data import build_text_splits, encoder
    from moqe_compile.evaluate.stats import paired_bootstrap
    from moqe_compile.tasks.causal_lm.model import load_causal_lm
    from moqe_compile.tasks.causal_lm.moe import find_moe
    from moqe_compile.tasks.causal_lm.moe_bits import (
        ExpertFakeQuant,
        allocate,
        history_path,
        load_gate_history,
        routing_stats,
    )

    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm("transformers", str(args.model))
    moe = find_moe(model)
    sp = build_text_splits(encoder(tok), tok.eos_token_id, moe_train.CORPORA, moe_train.FRACTIONS, moe_train.SEQ_LEN,
                           moe_train.SEED, args.max_test, args.calibration)
    calib, test = sp["calibration"].ids, sp["test"].ids
    per = ", ".join(f"{c} {int((sp['test'].corpus == c).sum())}" for c in moe_train.CORPORA)
    print(f"calibration {len(calib)} windows, test {len(test)} windows ({per})", flush=True)
    hist, why = load_gate_history(history_path("", str(args.model)), moe)
    if hist is None:
        print(f"WARNING: {why}", flush=True)
    t0 = time.time()
    stats = routing_stats(model, moe, calib, hessians=True)
    print(f"routing stats + Hessians {time.time() - t0:.0f}s; expert usage per layer (share of picks): "
          + "; ".join(" ".join(f"{x:.2f}" for x in row / row.sum()) for row in stats.counts), flush=True)
    cache_path = args.work / "nll-cache.npz"
    cache = np.load(cache_path, allow_pickle=False) if cache_path.is_file() else None
    cached = {k: cache[k] for k in cache.files} if cache is not None else {}
    key_base = hashlib.sha256((args.model / "model.safetensors").read_bytes()).hexdigest()[:12]

    def evaluate(tag: str, table, q) -> np.ndarray:  # cached by model, method and the bits table itself
        k = f"{key_base}|{tag.split('|')[0]}|{hashlib.sha256(json.dumps(table).encode()).hexdigest()[:16]}|{len(test)}"
        if k not in cached:
            t = time.time()
            q.apply(table)
            cached[k] = window_nll(model, test)
            q.restore()
            np.savez(cache_path, **cached)
            print(f"  {tag}: ppl {math.exp(cached[k].mean()):.3f} ({time.time() - t:.0f}s)", flush=True)
        return cached[k]

    fp = window_nll(model, test)
    non_expert = sum(p.numel() for p in model.parameters()) - moe.expert_params()
    res = {"model": str(args.model), "fp": {"ppl": math.exp(fp.mean()), "mean_nll": float(fp.mean())},
           "windows": {"test": len(test), "calibration": len(calib), "seq_len": int(test.shape[1])},
           "params": {"experts": moe.expert_params(), "other": int(non_expert)},
           "fp32_mb": 4 * (moe.expert_params() + non_expert) / 1e6,
           "gate_history": why or "present", "expert_usage": (stats.counts / stats.counts.sum(1, keepdims=True)).tolist(),
           "methods": {}}
    res["criteria"] = criteria_vs_usage(model, moe, hist, stats.counts, test)
    res["train_log"] = _train_summary(args.model)
    print(f"FP ppl {res['fp']['ppl']:.3f}; Spearman with usage on the test windows, per layer: "
          + json.dumps({k: [round(x, 2) for x in v] for k, v in res["criteria"]["spearman_vs_test_usage"].items()}),
          flush=True)
    widths = [int(w) for w in args.widths.split(",")]
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"--methods: {method!r} is not one of {list(METHODS)}")
        name, sym = METHODS[method]
        q = ExpertFakeQuant(moe, name, group=32, symmetric=sym, stats=stats)
        mres = {"uniform_widths": {}, "averages": {}}
        print(f"== {method}", flush=True)
        for b in widths:
            v = evaluate(f"{method}|uniform|{b}", [[b] * moe.num_experts for _ in moe.blocks], q)
            mres["uniform_widths"][str(b)] = _row(v, [[b] * moe.num_experts] * len(moe.blocks), moe, sym)
        for avg in [float(a) for a in args.averages.split(",")]:
            rows, nll = {}, {}
            for a in ALLOCS:
                if a == "uniform":
                    table = [[avg] * moe.num_experts for _ in moe.blocks]
                else:
                    table = allocate(moe, a, avg, widths, history=hist, history_reason=why, counts=stats.counts).bits
                nll[a] = evaluate(f"{method}|{a}|{avg}", table, q)
                rows[a] = _row(nll[a], table, moe, sym)
            rand = []
            for s in range(args.random_seeds):
                table = allocate(moe, "random", avg, widths, seed=s).bits
                rand.append(evaluate(f"{method}|random{s}|{avg}", table, q))
                rows[f"random-{s}"] = _row(rand[-1], table, moe, sym)
            rand = np.stack(rand)
            rows["random-mean"] = {"ppl": math.exp(rand.mean()), "mean_nll": float(rand.mean())}
            comp = {}
            for a in ("combined", "gate-norm", "maxvar", "frequency"):
                comp[a] = {"vs_uniform": paired_bootstrap(nll["uniform"], nll[a]),
                           "vs_random": hier_bootstrap(nll[a], rand),
                           "beats_random_seeds": int(sum(r.mean() > nll[a].mean() for r in rand))}
            mres["averages"][str(avg)] = {"rows": rows, "comparisons": comp}
            for a, c in comp.items():
                u, r = c["vs_uniform"], c["vs_random"]
                print(f"  avg {avg} {a}: vs uniform {u['diff']:+.4f} [{u['ci95'][0]:+.4f}, {u['ci95'][1]:+.4f}] "
                      f"vs random {r['diff']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] "
                      f"(beats {c['beats_random_seeds']}/{len(rand)} seeds)", flush=True)
        res["methods"][method] = mres
    return res


def criteria_vs_usage(model, moe, hist, calib_counts: np.ndarray, test: np.ndarray) -> dict:
    """Each criterion's score per expert (gate-norm change, MaxVar, frequency = share of the
    calibration picks) and its Spearman rank correlation, per layer, with the expert's share of
    the picks on the *test* windows (usage measured on text no criterion saw; the calibration
    share would make frequency's correlation 1 by construction)."""
    from scipy.stats import spearmanr

    from moqe_compile.tasks.causal_lm.moe_bits import expert_scores, routing_stats

    sc = expert_scores(moe, hist, calib_counts)
    usage = routing_stats(model, moe, test).counts
    rho = {k: [float(spearmanr(sc[k][i], usage[i]).statistic) for i in range(len(moe.blocks))]
           for k in ("gate_norm_change", "maxvar", "frequency") if k in sc}
    return {**sc, "test_usage": (usage / usage.sum(1, keepdims=True)).tolist(), "spearman_vs_test_usage": rho}


def _train_summary(model_dir: Path) -> dict:
    """The trained model's provenance (bench/moe_train.py's train_log.json, curve left out)."""
    p = Path(model_dir) / "train_log.json"
    if not p.is_file():
        return {}
    log = json.loads(p.read_text())
    return {k: v for k, v in log.items() if k not in ("curve", "log")}


def _row(v: np.ndarray, table, moe, symmetric: bool) -> dict:
    from moqe_compile.tasks.causal_lm.moe_bits import expert_bytes

    return {"ppl": math.exp(v.mean()), "mean_nll": float(v.mean()), "mean_bits": float(np.mean(table)),
            "expert_mb": expert_bytes(moe, table, 32, symmetric) / 1e6}


def onnx_grid(args) -> dict:
    """Build the {4, 8} bundle with the compiler and compare its experts' per-window test losses."""
    from moqe_compile.bundle import read_bundle
    from moqe_compile.evaluate.stats import paired_bootstrap
    from moqe_compile.tasks.causal_lm.config import load_lm_recipe
    from moqe_compile.build import build as build_lm

    out = args.work / "bundle"
    if not (out / "manifest.json").is_file():
        cfg = load_lm_recipe(args.recipe)
        if args.model_given:  # the recipe's widths and allocations on another trained model
            cfg.model.path = str(args.model.resolve())
            cfg.data.corpora = [str(args.model.resolve() / "heldout.txt")]
        build_lm(cfg, out)
    b = read_bundle(out)
    m = b.manifest
    with np.load(b.file("report/loss_matrix.npz"), allow_pickle=False) as z:
        names = [str(n) for n in z["expert_names"]]
        loss, fp = z["test_loss"], z["test_nll"]
    col = {n: loss[:, i] for i, n in enumerate(names)}
    size = {e["name"]: b.file(e["variants"]["onnxruntime-cpu"]["path"]).stat().st_size / 1e6 for e in m["experts"]}
    rows = {n: {"ppl": math.exp(col[n].mean()), "mean_nll": float(col[n].mean()), "onnx_mb": size[n],
                "mean_bits": next(e for e in m["experts"] if e["name"] == n).get("moe_bits", {}).get("mean_bits"),
                "criterion": next(e for e in m["experts"] if e["name"] == n).get("moe_bits", {}).get("criterion")}
            for n in names}
    rand = np.stack([col[n] for n in names if n.startswith("moe-random")])
    comp = {}
    for a in [n for n in names if n in ("moe-combined", "moe-frequency")]:
        comp[a] = {"vs_random": hier_bootstrap(col[a], rand),
                   "vs_uniform4": paired_bootstrap(col["moe-uniform-4"], col[a]),
                   "vs_uniform8": paired_bootstrap(col["moe-uniform-8"], col[a]),
                   "beats_random_seeds": int(sum(r.mean() > col[a].mean() for r in rand))}
    res = {"bundle": str(out), "fp": {"ppl": math.exp(fp.mean())}, "test_windows": int(len(fp)), "rows": rows,
           "comparisons": comp, "fp_onnx_mb": b.file(m["model"]["fp"]["path"]).stat().st_size / 1e6,
           "build_seconds": m["report"]["build_seconds"]}
    for n, r in rows.items():
        print(f"{n:<16} ppl {r['ppl']:.3f}  mean bits {r['mean_bits']}  ONNX {r['onnx_mb']:.2f} MB", flush=True)
    for a, c in comp.items():
        print(a, json.dumps({k: (v if isinstance(v, int) else {kk: v[kk] for kk in ("diff", "ci95", "p_value")})
                             for k, v in c.items()}), flush=True)
    return res


def main(argv=None) -> int:
    import moe_train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help=f"a bench/moe_train.py output directory (default {moe_train.DEFAULT_OUT}; the converged "
                         f"run's: {moe_train.CONVERGED_OUT})")
    add_json_option(ap)
    ap.add_argument("--widths", default="2,3,4")
    ap.add_argument("--averages", default="2.5,3,3.5")
    ap.add_argument("--methods", default="gptq-asym,rtn-asym", help=f"of {list(METHODS)}")
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--max-test", type=int, default=96, help="test windows per corpus (0 = all)")
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows per corpus")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None,
                    help="keeps the NLL cache and the --onnx bundle, so a rerun resumes (default: a temporary folder)")
    ap.add_argument("--onnx", action="store_true", help="the {4, 8} bundle instead of the fake-quant grid")
    ap.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "moqe_compile" / "recipes"
                                            / "moe-mixtral-8x4m.toml"))
    args = ap.parse_args(argv)
    args.model_given = args.model is not None
    args.model = (args.model or moe_train.DEFAULT_OUT).expanduser()
    if not moe_train.is_complete(args.model):
        print(f"no trained model in {args.model}: run bench/moe_train.py first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="moqe-moe-bits-") as tmp:
        args.work = args.work or Path(tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        res = onnx_grid(args) if args.onnx else fake_quant_grid(args)
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
