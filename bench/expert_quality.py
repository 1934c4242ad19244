"""Quality, cost and diversity of every expert preset on one model.

    python bench/expert_quality.py moqe_compile/recipes/fmnist-cnn.toml \\
        --json bench/results/epyc-2core/fmnist-experts.json
    python bench/expert_quality.py moqe_compile/recipes/mobilenetv2-demo.toml --presets minmax,mse,mse-bc --split test

For each preset: top-1 on the split (labelled data) with a bootstrap 95% CI, FP top-1
agreement, output cosine, mean KL to FP, build (calibration + weights) time, and ONNX Runtime
CPU latency at batch 1 and 16 vs FP32 measured interleaved in this one process (medians).
Then the diversity of each expert *set* (all INT8 presets; all W4A8 presets): pairwise
disagreement of top-1 predictions, and the oracle (a sample counts as correct when any expert
of the set is right; without labels, the lowest KL) vs the best single expert of the set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moqe_compile.backends import OrtCpuSession
from moqe_compile.tasks.image.config import EXPERT_PRESETS, ExpertRecipe, load_recipe
from moqe_compile.tasks.image.data import build_splits
from moqe_compile.evaluate.latency import time_interleaved
from moqe_compile.evaluate.stats import bootstrap_ci
from moqe_compile.tasks.image.preprocess import Preprocess
from moqe_compile.tasks.image.model import load_fp_model
from moqe_compile.quantize import prepare_for_quantization
from moqe_compile.tasks.image.experts import build_expert
from moqe_compile.tasks.image.score import diversity, expert_metrics, run_batched

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def latency(sessions: dict, x: np.ndarray, batches: list[int], repeats: int) -> dict:
    out = {}
    for bs in batches:
        xb = np.ascontiguousarray(x[:bs])
        timed = time_interleaved({k: (lambda s=s: s.run(xb)) for k, s in sessions.items()}, repeats)
        out[str(bs)] = {k: v["median_ms"] for k, v in timed.items()}
    return out


def set_diversity(names: list[str], logits: dict, fp: np.ndarray, labels: np.ndarray | None) -> dict:
    return diversity(np.stack([logits[n] for n in names]), names, fp, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--presets", default="all", help="comma-separated preset names, or 'all'")
    ap.add_argument("--split", default="test", choices=["test", "router_val", "router_train"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--adaround-iters", type=int, default=300)
    add_json_option(ap)
    args = ap.parse_args()

    cfg = load_recipe(args.recipe)
    names = list(EXPERT_PRESETS) if args.presets == "all" else args.presets.split(",")
    with tempfile.TemporaryDirectory(prefix="moqe-bench-") as tmp:
        work = Path(tmp)
        fp = load_fp_model(cfg.model, cfg.preprocessing, work / "fp.onnx")
        splits = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))
        calib, ev = splits["calibration"].x, splits[args.split]
        prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
        fp_sess = OrtCpuSession("fp32", fp.path)
        fp_logits = run_batched(fp_sess, ev.x, 256)
        rows, logits, sessions = {}, {}, {"fp32": fp_sess}
        for n in names:
            r = ExpertRecipe.from_preset(n, n, adaround_iters=args.adaround_iters)
            out = work / f"{n}.onnx"
            t = time.perf_counter()
            info = build_expert(prepared, fp.input_name, calib, r, ["onnxruntime-cpu"], {"onnxruntime-cpu": out},
                                work / f"{n}.json", work)
            build_s = time.perf_counter() - t
            sessions[n] = OrtCpuSession(n, out)
            logits[n] = run_batched(sessions[n], ev.x, 256)
            m = expert_metrics(logits[n], fp_logits, ev.labels)
            if ev.labels is not None:
                m["top1_ci95"] = list(bootstrap_ci((logits[n].argmax(-1) == ev.labels).astype(np.float64))[1])
            m["build_s"] = round(build_s, 2)
            m["steps"] = info["steps"]
            m["kernels"] = info["variants"]["onnxruntime-cpu"]["check"]["kernels"]["integer"]
            rows[n] = m
            print(f"{n:<18} " + "  ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)),
                  file=sys.stderr, flush=True)
        fp_m = expert_metrics(fp_logits, fp_logits, ev.labels)
        lat = latency(sessions, ev.x, args.batches, args.repeats)
    w8 = [n for n in names if not EXPERT_PRESETS[n].get("weight_bits") == 4]
    w4 = [n for n in names if EXPERT_PRESETS[n].get("weight_bits") == 4]
    result = {"recipe": args.recipe, "split": args.split, "n": int(len(ev.x)), "fp": fp_m, "experts": rows,
              "latency_ms": lat,
              "speedup_vs_fp32": {b: {n: round(v["fp32"] / v[n], 3) for n in names} for b, v in lat.items()},
              "diversity": {"int8": set_diversity(w8, logits, fp_logits, ev.labels) if len(w8) > 1 else None,
                            "w4a8": set_diversity(w4, logits, fp_logits, ev.labels) if len(w4) > 1 else None}}
    metric = "top1" if ev.labels is not None else "fp_top1_agreement"
    print(f"\n{args.recipe} — {args.split} split, n = {len(ev.x)}; FP {metric} = {fp_m[metric]:.4f}\n")
    print(f"| preset | {metric} | 95% CI | FP agree | cosine | KL to FP | build s | "
          + " | ".join(f"x FP32 @b{b}" for b in args.batches) + " |")
    print("|---|---:|---|---:|---:|---:|---:|" + "---:|" * len(args.batches))
    for n, m in rows.items():
        ci = m.get("top1_ci95")
        print(f"| {n} | {m[metric]:.4f} | {f'[{ci[0]:.4f}, {ci[1]:.4f}]' if ci else '-'} | "
              f"{m['fp_top1_agreement']:.4f} | {m['output_cosine']:.4f} | {m['kl_to_fp']:.4f} | {m['build_s']:.1f} | "
              + " | ".join(f"{result['speedup_vs_fp32'][str(b)][n]:.2f}" for b in args.batches) + " |")
    for k, d in result["diversity"].items():
        if d:
            print(f"\n{k} set: best single {d['best_single']} {d['best_single_value']:.4f}, oracle {d['oracle_value']:.4f} "
                  f"(+{100 * d['oracle_gain']:.2f} points), mean pairwise disagreement {d['mean_pairwise_disagreement']:.4f}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
