"""Latency of a bundle on ONNX Runtime CPU: router alone, each expert alone, FP32, and the
whole MoQE path (route + grouped dispatch), at several batch sizes, measured side by side.

    python bench/latency.py bundles/mobilenetv2-demo --batches 1 32 --repeats 30 [--json out.json]

All variants run interleaved in one process on the same inputs (real images from the
bundle's data source when available, otherwise the demo photos); medians and IQR over
``--repeats`` rounds. Ratios (INT8/FP32, MoQE/expert) are taken from these medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from moqe_compile import Runtime
from moqe_compile.backends import OrtCpuSession
from moqe_compile.data.datasets import foolbox_dir


def sample_batch(rt: Runtime, n: int) -> np.ndarray:
    _, x = rt.load_inputs(foolbox_dir())  # the 100 demo photos (ImageNet, CIFAR, MNIST...)
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n])


def summarize(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4)
    return {"median_ms": round(statistics.median(xs), 3), "iqr_ms": [round(q[0], 3), round(q[2], 3)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()

    rt = Runtime.load(args.bundle)
    fp = OrtCpuSession("fp32", rt.root / rt.manifest["model"]["fp"]["path"])
    router = rt._router
    results = {"bundle": str(args.bundle), "cpu": platform.processor() or platform.machine(),
               "repeats": args.repeats, "batches": {}}
    for bs in args.batches:
        x = sample_batch(rt, bs)
        cands = {"router": lambda: router.run(x), "fp32": lambda: fp.run(x), "moqe": lambda: rt.run(x)}
        for name in rt.expert_names:
            cands[f"expert:{name}"] = (lambda n=name: rt.run_expert(n, x))
        # Interleave candidates round by round so drift (thermal, other load) hits all alike.
        samples = {k: [] for k in cands}
        for f in cands.values():  # warm-up: arenas, kernel selection
            f()
        for _ in range(args.repeats):
            for k, f in cands.items():
                t = time.perf_counter()
                f()
                samples[k].append((time.perf_counter() - t) * 1e3)
        row = {k: summarize(v) for k, v in samples.items()}
        med = {k: v["median_ms"] for k, v in row.items()}
        experts = [med[f"expert:{n}"] for n in rt.expert_names]
        row["ratios"] = {
            "int8_over_fp32": {n: round(med[f"expert:{n}"] / med["fp32"], 3) for n in rt.expert_names},
            "router_over_mean_expert": round(med["router"] / statistics.mean(experts), 3),
            "moqe_over_mean_expert": round(med["moqe"] / statistics.mean(experts), 3),
        }
        row["experts_used"] = sorted(set(rt.run(x).experts))
        results["batches"][str(bs)] = row
        print(f"batch {bs}:")
        for k, v in row.items():
            if k not in ("ratios", "experts_used"):
                print(f"  {k:<22} median {v['median_ms']:9.3f} ms   IQR {v['iqr_ms']}")
        print(f"  ratios {json.dumps(row['ratios'])}  experts used {row['experts_used']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
