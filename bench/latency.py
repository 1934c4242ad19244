"""Latency of a bundle on ONNX Runtime CPU: router alone, each expert alone, FP32, and the
whole MoQE path (route + grouped dispatch), at several batch sizes, measured side by side.

    python bench/latency.py bundles/mobilenetv2-demo --batches 1 32 --repeats 30 [--json PATH]

All variants run interleaved in one process on the same inputs (the demo photos shipped in
the foolbox package); medians and IQR over ``--repeats`` rounds. Ratios (INT8/FP32,
MoQE/expert) are taken from these medians. The measuring code lives in
``moqe_compile.tasks.image.eval.measure_bundle`` (``moqe-compile eval`` uses it too); this is its CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moqe_compile import Runtime
from moqe_compile.backends import OrtCpuSession
from moqe_compile.tasks.image.data import foolbox_dir
from moqe_compile.evaluate.latency import format_batch
from moqe_compile.tasks.image.eval import measure_bundle

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=30)
    add_json_option(ap)
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
    write_json(args.json, results)


if __name__ == "__main__":
    main()
