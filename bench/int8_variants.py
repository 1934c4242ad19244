"""INT8 expert vs FP32 on ONNX Runtime CPU under session and input variants, side by side.

    python bench/int8_variants.py bundles/mobilenetv2-demo --batches 1 32 --repeats 20 [--json PATH]

For the bundle's default expert and its FP32 model, each variant builds one session per
model and every session runs interleaved round by round on the same photos
(``evaluate/latency.py``); medians over ``--repeats`` rounds, speed-up = FP32 median / INT8
median of the same variant. Variants:

- ``shipped``: what the Runtime uses (``optimization = "all"``, ONNX Runtime's default thread
  count, the session factory's spin-wait policy: ``$MOQE_ORT_SPINNING``, by default spinning
  only during a run);
- ``no-nhwc``: level ``all`` without the ``NhwcTransformer`` (QLinearConv in NCHW);
- ``extended`` / ``basic``: lower graph optimization levels;
- ``spinning``: intra-op threads spin-wait also after a run (ONNX Runtime's own default, which
  the Runtime avoids because back-to-back sessions starve each other; a lone session may gain);
- ``1-thread``: one intra-op thread;
- ``uint8-in``: the model preceded by ``Cast`` + per-channel ``Mul``/``Add`` (input
  normalization folded into the graph, uint8 pixels in), timed from uint8 pixels, against
  ``shipped`` fed the same pixels normalized in numpy (``shipped+numpy-norm``).
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

VARIANTS = {
    "shipped": {},
    "no-nhwc": {"disabled_optimizers": ("NhwcTransformer",)},
    "extended": {"optimization": "extended"},
    "basic": {"optimization": "basic"},
    "spinning": {"spinning": "always"},
    "1-thread": {"threads": 1},
}


def with_uint8_input(model_bytes: bytes, mean, std) -> bytes:
    """The graph taking uint8 pixels: x = pixels * (1 / (255 std)) - mean / std, per channel,
    then the original graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load_from_string(model_bytes)
    g = m.graph
    inp = g.input[0]
    name = inp.name
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(1, -1, 1, 1).astype(np.float32)
    shift = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, -1, 1, 1).astype(np.float32)
    g.initializer.extend([numpy_helper.from_array(scale, "pix_scale"), numpy_helper.from_array(shift, "pix_shift")])
    pre = [helper.make_node("Cast", ["pixels"], ["pix_f"], to=TensorProto.FLOAT),
           helper.make_node("Mul", ["pix_f", "pix_scale"], ["pix_s"]),
           helper.make_node("Add", ["pix_s", "pix_shift"], [name])]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    new_in = helper.make_tensor_value_info("pixels", TensorProto.UINT8, dims)
    nodes = pre + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    g.input.remove(inp)
    g.input.insert(0, new_in)
    return m.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=[*VARIANTS, "uint8-in"])
    add_json_option(ap)
    args = ap.parse_args()

    rt = Runtime.load(args.bundle)
    expert, paths = served_and_fp_paths(rt)
    pre = rt.preprocess
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    sess = {}
    for v in args.variants:
        for kind, p in paths.items():
            if v == "uint8-in":
                sess[v, kind] = session(with_uint8_input(p.read_bytes(), mean, std), name=f"{kind}-{v}")
            else:
                sess[v, kind] = session(p, name=f"{kind}-{v}", **VARIANTS[v])
    _, pool = rt.load_inputs(foolbox_dir())
    # uint8 pixels that normalize (as Preprocess does) to the float inputs, up to rounding
    pix_pool = np.clip(np.rint((pool * std[None, :, None, None] + mean[None, :, None, None]) * 255), 0, 255
                       ).astype(np.uint8)
    results = {"bundle": str(args.bundle), "expert": expert, "repeats": args.repeats, "batches": {}}
    for bs in args.batches:
        x, px = tile_batch(pool, bs), tile_batch(pix_pool, bs)
        cands = {}
        for (v, kind), s in sess.items():
            feed = s.get_inputs()[0].name
            if v == "uint8-in":
                cands[f"{v}/{kind}"] = (lambda s=s, f=feed: s.run(None, {f: px}))
                base = sess["shipped", kind] if ("shipped", kind) in sess else None
                if base is not None:
                    bf = base.get_inputs()[0].name

                    def numpy_norm(s=base, f=bf):
                        xn = (px.astype(np.float32) / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
                        return s.run(None, {f: xn})
                    cands[f"shipped+numpy-norm/{kind}"] = numpy_norm
            else:
                cands[f"{v}/{kind}"] = (lambda s=s, f=feed: s.run(None, {f: x}))
        row = time_interleaved(cands, args.repeats)
        names = sorted({k.split("/")[0] for k in row})
        summary = {}
        for v in names:
            i8, fp = row.get(f"{v}/int8"), row.get(f"{v}/fp32")
            if i8 and fp:
                summary[v] = {"int8_ms": i8["median_ms"], "fp32_ms": fp["median_ms"],
                              "speedup": round(fp["median_ms"] / i8["median_ms"], 3)}
        results["batches"][str(bs)] = {"timings": row, "summary": summary}
        print(f"batch {bs}:")
        for v, r in summary.items():
            print(f"  {v:<20} int8 {r['int8_ms']:9.3f} ms  fp32 {r['fp32_ms']:9.3f} ms  fp32/int8 {r['speedup']:.2f}x")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
