"""Router latency budget: each router preset (float and INT8) against one expert of a bundle,
on ONNX Runtime CPU, at batch 1 and 32. The design's budget: router <= 5% of one expert.

    python bench/router_budget.py bundles/mobilenetv2-demo --presets default small paper \\
        --batches 1 32 --repeats 30 [--threads 0 1] [--json PATH]

Routers are built here from ``RouterConfig(preset=...)`` with random weights (latency does
not depend on the weights; INT8 ranges come from the same inputs) and exported through
the build's own ``export_router``. Every candidate (each router variant x intra-op thread
count, and the expert) runs interleaved round by round in one process on the same real
photos (bench/latency.py's method); medians over ``--repeats`` rounds, ratio = router
median / expert median. Expert sessions use ONNX Runtime's default thread count, as the
Runtime does; the Runtime runs the router on 1 thread (``t1``) for batches of 1-2 and with
the default count (``t0``) above, so the deployed figures are t1 at batch 1, t0 at batch 32.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from moqe_compile import Runtime
from moqe_compile.backends import OrtCpuSession
from moqe_compile.tasks.image.data import foolbox_dir
from moqe_compile.evaluate.latency import tile_batch, time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def sample_batch(rt: Runtime, n: int) -> np.ndarray:
    _, x = rt.load_inputs(foolbox_dir())  # the 100 demo photos (ImageNet, CIFAR, MNIST...)
    return tile_batch(x, n)


def build_router(preset: str, quantize: str, rt: Runtime, out: Path, calib: np.ndarray) -> Path:
    import torch

    from moqe_compile.tasks.image.config import RouterConfig
    from moqe_compile.tasks.image.router import CVRouterCore
    from moqe_compile.tasks.image.router_export import export_router

    cfg = RouterConfig(preset=preset, quantize=quantize)
    torch.manual_seed(0)
    core = CVRouterCore(cfg, len(rt.expert_names), in_channels=rt.preprocess.channels).eval()
    p = out / f"{preset}-{quantize}.onnx"
    export_router(core, cfg.input_size, rt.preprocess.crop, p, out / f"{preset}-{quantize}.safetensors",
                  channels=rt.preprocess.channels, mode=cfg.downsample, quantize=quantize, calib_x=calib)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--presets", nargs="+", default=["default", "small"])
    ap.add_argument("--quantize", nargs="+", default=["none", "int8"])
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="router intra-op threads (0: ORT default)")
    ap.add_argument("--expert", default=None, help="expert to compare with (default: the bundle's default expert)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=30)
    add_json_option(ap)
    args = ap.parse_args()

    rt = Runtime.load(args.bundle)
    expert = args.expert or rt.expert_names[rt.default_expert]
    calib = sample_batch(rt, 64)
    routers = {}
    with tempfile.TemporaryDirectory(prefix="router-budget-") as tmp:
        for preset in args.presets:
            for q in args.quantize:
                path = build_router(preset, q, rt, Path(tmp), calib)
                for th in args.threads:
                    routers[f"{preset}/{q}/t{th}"] = OrtCpuSession(f"{preset}-{q}", path, th)
    results = {"bundle": str(args.bundle), "expert": expert, "cpu": platform.processor() or platform.machine(),
               "repeats": args.repeats, "batches": {}}
    for bs in args.batches:
        x = sample_batch(rt, bs)
        cands = {f"expert:{expert}": lambda: rt.run_expert(expert, x)}
        for k, s in routers.items():
            cands[f"router:{k}"] = (lambda s=s: s.run(x))
        row = time_interleaved(cands, args.repeats)
        e = row[f"expert:{expert}"]["median_ms"]
        for k in routers:
            row[f"router:{k}"]["ratio_to_expert"] = round(row[f"router:{k}"]["median_ms"] / e, 4)
        results["batches"][str(bs)] = row
        print(f"batch {bs}: expert {expert} median {e:.3f} ms")
        for k in routers:
            r = row[f"router:{k}"]
            ok = "meets" if r["ratio_to_expert"] <= 0.05 else "over"
            print(f"  router {k:<22} median {r['median_ms']:8.3f} ms  IQR {r['iqr_ms']}  "
                  f"ratio {r['ratio_to_expert']:.3f}  ({ok} the 5% budget)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
