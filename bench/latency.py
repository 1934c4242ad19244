"""Latency of a bundle on ONNX Runtime CPU: router alone, each expert alone, FP32, and the
whole MoQE path (route + grouped dispatch), at several batch sizes, measured side by side.

    python bench/latency.py bundles/mobilenetv2-demo --batches 1 32 --repeats 30 [--json out.json]

All variants run interleaved in one process on the same inputs (the demo photos shipped in
the foolbox package); medians and IQR over ``--repeats`` rounds. Ratios (INT8/FP32,
MoQE/expert) are taken from these medians. The measuring code lives in
``moqe_compile.evaluate.latency`` (``moqe-compile eval`` uses it too); this is its CLI.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from moqe_compile import Runtime
from moqe_compile.backends import OrtCpuSession
from moqe_compile.data.datasets import foolbox_dir
from moqe_compile.evaluate.latency import format_batch, measure_bundle, tile_batch


def sample_batch(rt: Runtime, n: int) -> np.ndarray:
    _, x = rt.load_inputs(foolbox_dir())  # the 100 demo photos (ImageNet, CIFAR, MNIST...)
    return tile_batch(x, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()

    rt = Runtime.load(args.bundle)
    fp = OrtCpuSession("fp32", rt.root / rt.manifest["model"]["fp"]["path"])
    _, pool = rt.load_inputs(foolbox_dir())
    results = {"bundle": str(args.bundle), "repeats": args.repeats, "batches": {}}
    for bs in args.batches:
        r = measure_bundle(rt, pool, [bs], args.repeats, fp_session=fp)
        results["cpu"] = r["cpu"]
        results["batches"][str(bs)] = row = r["batches"][str(bs)]
        print(format_batch(bs, row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
