"""The strongest single expert and what each of its components adds.

    python bench/strongest_ablation.py moqe_compile/recipes/fmnist-cnn.toml \\
        --json bench/results/epyc-2core/fmnist-strongest.json
    python bench/strongest_ablation.py moqe_compile/recipes/fmnist-cnn.toml --bits 4 --split router_val --candidates \\
        --json bench/results/epyc-2core/fmnist-strongest-val-candidates.json

For each weight width (W8A8, W4A8) it builds, on the recipe's calibration split, the chain
(one component added per row) and the leave-one-out variants of the ``strongest`` preset:

    base              MinMax weights, nearest rounding, MSE activation ranges on the FP stream
    +weight-MSE clip  per-channel clip minimizing the weights' squared error
    +gptq             GPTQ rounding with the Hessian of the quantized input stream
    +output-MSE clip  per-channel clip minimizing the layer's output error after GPTQ
    +seq-act          activation ranges refitted (MSE) layer by layer on the quantized stream
    +bc               sequential empirical bias correction  (= the `strongest` preset)
    strongest - X     for each component X

and evaluates every expert on the test split: top-1 with its bootstrap 95% CI, the paired
difference to FP (bootstrap 95% CI, exact McNemar p), FP top-1 agreement and KL to FP.
Nothing is chosen on the test split: the recipes are fixed before this runs.
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
from moqe_compile.tasks.image.config import STRONGEST, ExpertRecipe, load_recipe
from moqe_compile.tasks.image.data import build_splits
from moqe_compile.tasks.image.preprocess import Preprocess
from moqe_compile.evaluate.stats import bootstrap_ci, paired_compare
from moqe_compile.tasks.image.model import load_fp_model
from moqe_compile.quantize import prepare_for_quantization
from moqe_compile.tasks.image.experts import build_expert
from moqe_compile.tasks.image.score import expert_metrics, run_batched

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402

BASE = {"calibration": "mse", "weight_clip": "minmax", "weight_rounding": "nearest", "sequential_activations": False,
        "bias_correction": False}
CHAIN = [("base", {}), ("+weight-MSE clip", {"weight_clip": "mse"}), ("+gptq", {"weight_rounding": "gptq"}),
         ("+output-MSE clip (replaces weight-MSE)", {"weight_clip": "mse-output"}),
         ("+seq-act", {"sequential_activations": True}), ("+bc (strongest)", {"bias_correction": True})]
LEAVE_OUT = {"output-MSE clip, weight-MSE instead": {"weight_clip": "mse"},
             "output-MSE clip, minmax instead": {"weight_clip": "minmax"},
             "gptq (nearest, weight-MSE clip)": {"weight_rounding": "nearest", "weight_clip": "mse"},
             "seq-act": {"sequential_activations": False}, "bc": {"bias_correction": False}}


def variants(bits: int) -> list[tuple[str, dict]]:
    out, cur = [], dict(BASE)
    for name, change in CHAIN:
        cur = {**cur, **change}
        out.append((name, dict(cur)))
    assert out[-1][1] == {**BASE, **STRONGEST}
    out += [(f"strongest - {k}", {**STRONGEST, **v}) for k, v in LEAVE_OUT.items()]
    return [(n, {**f, "weight_bits": bits}) for n, f in out]


# Alternatives to the preset, compared on router_val only (never on test) before fixing it.
CANDIDATES = [("weight-MSE clip", {"weight_clip": "mse"}), ("minmax clip", {"weight_clip": "minmax"}),
              ("output-MSE clip", {"weight_clip": "mse-output"}),
              ("weight-MSE clip, 2048 stream samples", {"weight_clip": "mse", "stream_samples": 2048}),
              ("weight-MSE clip, damp 0.1", {"weight_clip": "mse", "gptq_damp": 0.1})]


def candidates(bits: int) -> list[tuple[str, dict]]:
    return [(n, {**STRONGEST, **c, "weight_bits": bits}) for n, c in CANDIDATES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--split", default="test", choices=["test", "router_val"])
    ap.add_argument("--candidates", action="store_true",
                    help="compare the preset's alternatives (use with --split router_val) instead of the ablation")
    add_json_option(ap)
    args = ap.parse_args()

    cfg = load_recipe(args.recipe)
    rows: dict = {}
    with tempfile.TemporaryDirectory(prefix="moqe-strongest-") as tmp:
        work = Path(tmp)
        fp = load_fp_model(cfg.model, cfg.preprocessing, work / "fp.onnx")
        splits = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))
        calib, ev = splits["calibration"].x, splits[args.split]
        if ev.labels is None:
            sys.exit("this bench needs a labelled split")
        prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
        fp_logits = run_batched(OrtCpuSession("fp32", fp.path), ev.x, 256)
        fp_ok = (fp_logits.argmax(-1) == ev.labels).astype(np.float64)
        for bits in args.bits:
            for name, fields in (candidates(bits) if args.candidates else variants(bits)):
                key = f"W{bits}A8 {name}"
                r = ExpertRecipe(name=f"v{len(rows)}", **fields)
                out = work / f"{r.name}.onnx"
                t = time.perf_counter()
                info = build_expert(prepared, fp.input_name, calib, r, ["onnxruntime-cpu", "tensorrt"],
                                    {"onnxruntime-cpu": out, "tensorrt": work / f"{r.name}.trt.onnx"},
                                    work / f"{r.name}.json", work)
                build_s = time.perf_counter() - t
                logits = run_batched(OrtCpuSession(r.name, out), ev.x, 256)
                ok = (logits.argmax(-1) == ev.labels).astype(np.float64)
                m = expert_metrics(logits, fp_logits, ev.labels)
                m["top1_ci95"] = list(bootstrap_ci(ok)[1])
                vs = paired_compare(ok, fp_ok)
                m["vs_fp"] = {"diff": vs["diff"], "ci95": vs["ci95"], "p_value": vs["p_value"], "test": vs["test"]}
                m["recipe"] = fields
                m["build_s"] = round(build_s, 2)
                m["steps"] = info["steps"]
                m["check_qdq"] = {b: v["check"]["ok"] for b, v in info["variants"].items()}
                rows[key] = m
                print(f"{key:<28} top1 {100 * m['top1']:.2f}  vs FP {100 * vs['diff']:+.2f} "
                      f"[{100 * vs['ci95'][0]:+.2f}, {100 * vs['ci95'][1]:+.2f}]  KL {m['kl_to_fp']:.4f}  "
                      f"{build_s:.1f}s", file=sys.stderr, flush=True)
    fp_m = expert_metrics(fp_logits, fp_logits, ev.labels)
    result = {"recipe": args.recipe, "split": args.split, "n": int(len(ev.x)), "calibration_n": int(len(calib)),
              "fp": fp_m, "variants": rows}
    print(f"\n{args.recipe}: {args.split} split, n = {len(ev.x)}, FP top-1 {100 * fp_m['top1']:.2f}\n")
    print("| variant | top-1 % [95% CI] | minus FP, points [95% CI] | McNemar p | FP agree | KL to FP | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, m in rows.items():
        ci, d = m["top1_ci95"], m["vs_fp"]
        print(f"| {k} | {100 * m['top1']:.2f} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}] | {100 * d['diff']:+.2f} "
              f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] | {d['p_value']:.3g} | "
              f"{m['fp_top1_agreement']:.4f} | {m['kl_to_fp']:.4f} | {m['build_s']:.1f} |")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
