"""An anchor for the CPU figures: OpenVINO runs the same ONNX graphs (the bundle's Q/DQ INT8
expert and its FP32 model) side by side with ONNX Runtime.

    pip install -e ".[bench]"
    python bench/openvino_anchor.py bundles/mobilenetv2-demo --batches 1 16 32 --repeats 20 [--json PATH]

ONNX Runtime: the project's session factory as the Runtime uses it (level ``all``, default
threads, no spin-waiting). OpenVINO: ``Core.read_model`` on the same file, reshaped to the
batch (static shapes, OpenVINO's fast path) and compiled for ``CPU`` with the ``LATENCY``
hint. Every session runs interleaved round by round on the same photos; medians over
``--repeats`` rounds. The outputs are compared too (max |logit difference| and top-1
agreement with ONNX Runtime), so a fast wrong answer shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from moqe_compile import Runtime
from moqe_compile.backends.onnxruntime_cpu import session
from moqe_compile.evaluate.latency import tile_batch, time_interleaved
from moqe_compile.tasks.image.data import foolbox_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, served_and_fp_paths, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--repeats", type=int, default=20)
    add_json_option(ap)
    args = ap.parse_args()

    import openvino as ov

    rt = Runtime.load(args.bundle)
    expert, paths = served_and_fp_paths(rt)
    core = ov.Core()
    ort = {k: session(p, name=k) for k, p in paths.items()}
    _, pool = rt.load_inputs(foolbox_dir())
    results = {"bundle": str(args.bundle), "expert": expert, "openvino": ov.get_version(),
               "repeats": args.repeats, "batches": {}}
    for bs in args.batches:
        x = tile_batch(pool, bs)
        cands, checks = {}, {}
        for k, p in paths.items():
            model = core.read_model(str(p))
            model.reshape({model.inputs[0].get_any_name(): [bs, *x.shape[1:]]})
            req = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
            feed = ort[k].get_inputs()[0].name
            cands[f"ort/{k}"] = (lambda s=ort[k], f=feed: s.run(None, {f: x}))
            cands[f"openvino/{k}"] = (lambda r=req: r.infer({0: x}))
            a = ort[k].run(None, {feed: x})[0]
            b = np.asarray(req.infer({0: x})[0])
            checks[k] = {"max_abs_logit_diff": float(np.abs(a - b).max()),
                         "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean())}
        row = time_interleaved(cands, args.repeats)
        results["batches"][str(bs)] = {"timings": row, "output_check": checks}
        print(f"batch {bs}:")
        for k in paths:
            o, v = row[f"ort/{k}"]["median_ms"], row[f"openvino/{k}"]["median_ms"]
            print(f"  {k:<5} onnxruntime {o:9.3f} ms  openvino {v:9.3f} ms  openvino/ort {v / o:.2f}  "
                  f"check {checks[k]}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
