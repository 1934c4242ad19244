"""Perplexity of single LM experts against FP, without building a bundle: what a weight recipe costs.

    nice -n 5 python bench/lm_weight_quality.py moqe_compile/recipes/smollm2-135m.toml --work WORK \\
        --test-windows 100 --calibration-windows 32 \\
        --expert hqq-h4=w4-hqq,block_size=128,head_bits=4 --expert hqq-h8=w4-hqq,block_size=128 \\
        --json bench/results/epyc-2core/smollm2-w4g128.json

Each ``--expert NAME=PRESET[,key=value...]`` is an LM expert recipe (docs/recipes.md; values
are TOML). The FP decoder is exported once into ``--work``, and each expert is quantized with
the build's own code (``tasks/causal_lm/experts.py``, SmoothQuant/AWQ as in the build) from the
recipe's calibration windows, then scored on the test split's windows (split by document,
never used for a choice): per corpus, perplexity with a bootstrap 95% interval, and the paired
ratio to FP (exp of the mean per-window NLL difference) with its interval. Results are cached per
expert name in ``--work`` (delete a file to rebuild); ``--threads`` caps ONNX Runtime's threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def parse_expert(spec: str) -> dict:
    name, _, rest = spec.partition("=")
    preset, *pairs = rest.split(",")
    d = {"name": name, "preset": preset}
    for p in pairs:
        k, _, v = p.partition("=")
        try:
            d[k] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            d[k] = v
    return d


def window_nll(sess, ids) -> "np.ndarray":
    """Per window, mean next-token NLL (one window per run, as the build scores)."""
    import numpy as np

    out = np.zeros(len(ids))
    for i, row in enumerate(ids):
        lg = sess.logits(row[None])[0, :-1].astype(np.float32)
        m = lg.max(-1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(lg - m).sum(-1)))
        out[i] = float((lse - lg[np.arange(len(lg)), row[1:]]).mean())
    return out


def reuse_sparser_scores(work: Path, name: str, pos, sel):
    """Scores of the selected windows already in a sparser run's cache (``NAME.nll-everyK.npy``
    holds the windows whose index within their corpus is a multiple of K, in test order), and
    the mask of those still to score: a denser run then scores only the windows it adds."""
    import numpy as np

    nll, todo = np.zeros(int(sel.sum())), np.ones(int(sel.sum()), bool)
    for k in range(2, 9):
        f = work / f"{name}.nll-every{k}.npy"
        if not f.is_file():
            continue
        cached, have = np.load(f), pos % k == 0
        if len(cached) != have.sum():
            continue  # from another --test-windows: not the same windows
        full = np.full(len(pos), np.nan)
        full[have] = cached
        got = ~np.isnan(full[sel]) & todo
        nll[got], todo[got] = full[sel][got], False
    return nll, todo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="an LM recipe: its [model] and [data] are used, its experts are not")
    ap.add_argument("--work", type=Path, required=True, help="cache folder (FP graph, windows, expert graphs)")
    ap.add_argument("--expert", action="append", default=[], help="NAME=PRESET[,key=value...] (repeatable)")
    ap.add_argument("--test-windows", type=int, default=100, help="test windows per corpus")
    ap.add_argument("--calibration-windows", type=int, default=32, help="calibration windows per corpus")
    ap.add_argument("--score-every", type=int, default=1,
                    help="score the experts on every k-th test window of each corpus (FP is scored on all)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--versus", default="", help="an expert already scored in --work: each expert's "
                    "perplexity ratio to it, paired on the same windows, is printed too")
    add_json_option(ap)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from moqe_compile.evaluate.stats import bootstrap_means, paired_bootstrap, percentile_interval
    from moqe_compile.tasks.causal_lm.config import expert_from_dict, load_lm_recipe
    from moqe_compile.tasks.causal_lm.data import build_text_splits, encoder
    from moqe_compile.tasks.causal_lm.model import export_decoder, load_causal_lm
    from moqe_compile.tasks.causal_lm.score import DecoderSession
    from moqe_compile.tasks.causal_lm.steps import calib_feeds

    torch.set_num_threads(args.threads)
    cfg = load_lm_recipe(args.recipe)
    experts = [expert_from_dict(parse_expert(s)) for s in args.expert]
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    model, tok = load_causal_lm(cfg.model.source, cfg.model.path)
    d = cfg.data
    splits = build_text_splits(encoder(tok), tok.eos_token_id, d.corpora,
                               {k: getattr(d.split, k) for k in ("calibration", "router_train", "router_val", "test")},
                               d.seq_len, d.seed, args.test_windows, args.calibration_windows)
    test, cal = splits["test"], splits["calibration"]
    print("test windows per corpus: " + ", ".join(f"{c} {(test.corpus == c).sum()}" for c in sorted(set(test.corpus)))
          + f"; calibration windows {len(cal)}", flush=True)
    fp = w / "fp.onnx"
    spec = export_decoder(model, fp, cfg.model.opset) if not fp.is_file() else None
    if spec is None:
        from moqe_compile.tasks.causal_lm.model import DecoderSpec

        spec = DecoderSpec.from_hf_config(model.config)
    dims = (spec.layers, spec.kv_heads, spec.head_dim)

    full, pos = test, np.zeros(len(test), int)  # each window's index within its corpus
    for c in set(test.corpus):
        pos[test.corpus == c] = np.arange((test.corpus == c).sum())
    keep = pos % args.score_every == 0

    def scored(name: str, path: Path, sel: np.ndarray) -> np.ndarray:
        f = w / f"{name}.nll{'' if sel.all() else f'-every{args.score_every}'}.npy"
        if not f.is_file():
            t0 = time.perf_counter()
            nll, todo = reuse_sparser_scores(w, name, pos, sel)
            if todo.any():
                nll[todo] = window_nll(DecoderSession(name, path, *dims, threads=args.threads), full.ids[sel][todo])
            np.save(f, nll)
            print(f"{name}: scored {int(todo.sum())} windows in {time.perf_counter() - t0:.0f} s "
                  f"({int((~todo).sum())} reused from a sparser run)", flush=True)
        return np.load(f)

    fp_nll = scored("fp", fp, np.ones(len(test), bool))[keep]
    test = type(test)(test.ids[keep], test.corpus[keep])
    results = {"windows": {c: int((test.corpus == c).sum()) for c in sorted(set(test.corpus))},
               "calibration_windows": len(cal), "seq_len": d.seq_len, "fp": {}, "experts": {}}
    for c in results["windows"]:
        v = fp_nll[test.corpus == c]
        lo, hi = percentile_interval(bootstrap_means(v))
        results["fp"][c] = {"ppl": float(np.exp(v.mean())), "ppl_ci95": [float(np.exp(lo)), float(np.exp(hi))]}
    for r in experts:
        path, meta = w / f"{r.name}.onnx", w / f"{r.name}.json"
        if not meta.is_file():
            t0 = time.perf_counter()
            info = build_expert(model, cfg, spec, r, cal.ids, path, w)
            info["build_seconds"] = round(time.perf_counter() - t0, 1)
            meta.write_text(json.dumps({"recipe": r.to_dict(), **info}))
            print(f"{r.name}: built in {info['build_seconds']} s", flush=True)
        info = json.loads(meta.read_text())
        nll = scored(r.name, path, keep)
        row = {"recipe": info["recipe"], "build_seconds": info["build_seconds"],
               "mean_weight_bits": info.get("mean_weight_bits")}
        for c in results["windows"]:
            sel = test.corpus == c
            lo, hi = percentile_interval(bootstrap_means(nll[sel]))
            t = paired_bootstrap(nll[sel], fp_nll[sel])
            row[c] = {"ppl": float(np.exp(nll[sel].mean())), "ppl_ci95": [float(np.exp(lo)), float(np.exp(hi))],
                      "ratio_to_fp": float(np.exp(t["diff"])),
                      "ratio_to_fp_ci95": [float(np.exp(x)) for x in t["ci95"]]}
        if args.versus:
            ref = scored(args.versus, w / f"{args.versus}.onnx", keep)
            for c in results["windows"]:
                sel = test.corpus == c
                t = paired_bootstrap(nll[sel], ref[sel])
                row[c]["versus"] = {"expert": args.versus, "ratio": float(np.exp(t["diff"])),
                                    "ratio_ci95": [float(np.exp(x)) for x in t["ci95"]], "p_value": t["p_value"]}
                print(f"{r.name} / {args.versus} on {c}: x{row[c]['versus']['ratio']:.3f} "
                      f"[{row[c]['versus']['ratio_ci95'][0]:.3f}, {row[c]['versus']['ratio_ci95'][1]:.3f}] "
                      f"p {t['p_value']:.3f}", flush=True)
        results["experts"][r.name] = row
    print(render(results))
    write_json(args.json, results)
    return 0


def build_expert(model, cfg, spec, r, cal_ids, path: Path, work: Path) -> dict:
    """The build's quantization of one expert (``LMSteps._quantize_one`` without the bundle)."""
    from moqe_compile.quantize.nbits import check_kernels, graph_weight_bits
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx
    from moqe_compile.tasks.causal_lm.model import export_decoder
    from moqe_compile.tasks.causal_lm.smoothing import rescale_for
    from moqe_compile.tasks.causal_lm.steps import calib_feeds

    src, tm = work / "fp.onnx", rescale_for(r, model, cal_ids)
    if tm is not model:
        src = work / f"{r.name}-scaled.onnx"
        export_decoder(tm, src, cfg.model.opset)
    quantize_onnx(src, r, path, calib_feeds(cal_ids, spec), model=tm, calib_ids=cal_ids)
    check = check_kernels(path, allow_fp_head=r.head_bits == 32)
    if not check["ok"]:
        raise SystemExit(f"{r.name}: float MatMuls left: {check['float_weight_matmuls'][:5]}")
    return {"mean_weight_bits": graph_weight_bits(path)["mean_weight_bits"]}


def render(res: dict) -> str:
    cs = list(res["windows"])
    head = "| expert | mean weight bits | " + " | ".join(f"{c} ({res['windows'][c]}) ppl [95% CI] | x FP [95% CI]"
                                                      for c in cs) + " | build s |"
    lines = [head, "|" + "---|" * (3 + 2 * len(cs))]

    def ci(a):
        return f"[{a[0]:.2f}, {a[1]:.2f}]"

    lines.append("| FP | 32 | " + " | ".join(f"{res['fp'][c]['ppl']:.2f} {ci(res['fp'][c]['ppl_ci95'])} | 1"
                                           for c in cs) + " | |")
    for n, r in res["experts"].items():
        bits = r["mean_weight_bits"]
        lines.append(f"| {n} | {bits:.2f} | " if bits else f"| {n} | | ")
        lines[-1] += " | ".join(f"{r[c]['ppl']:.2f} {ci(r[c]['ppl_ci95'])} | {r[c]['ratio_to_fp']:.3f} "
                                f"{ci(r[c]['ratio_to_fp_ci95'])}" for c in cs) + f" | {r['build_seconds']} |"
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
