"""Seconds per block-reconstruction step on a real network's largest blocks: the activation fake
quantization as separate tensor operations (what ``quantize/brecq.py`` did first) against
PyTorch's fused kernel, each with NCHW and NHWC convolutions. Medians over interleaved rounds.

    python bench/brecq_step.py mobilenetv2-demo --blocks 4 --steps 3 --rounds 3 [--json PATH]
    python bench/brecq_step.py RECIPE --blocks 3 --errors     # what rounding can and cannot recover

The blocks' inputs and FP targets are taken from a ``w4a8-brecq`` build of the recipe's first
32 calibration views (every block left at nearest rounding), then each variant runs ``--steps``
Adam steps of batch 32 on the same block. Not a quality comparison: the two quantizers differ only in
the gradient at the grid's edge bin (fused: passed, separate ops: stopped by the clamp).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_json_option, write_json  # noqa: E402


def separate_ops_quantize(x, s, zp, qdrop, gen):
    """The first implementation: straight-through rounding written as tensor operations."""
    import torch

    from moqe_compile.quantize import brecq

    lo, hi = brecq._int_range(zp.numpy().dtype)  # noqa: SLF001
    s, z = s.float(), zp.float()
    v = x / s
    q = torch.clamp(v + (torch.round(v) - v).detach() + z, lo, hi)
    return brecq._FQ((q - z) * s)  # noqa: SLF001


def capture_blocks(recipe_name: str, n_blocks: int, work: Path) -> list[dict]:
    import onnx

    from moqe_compile import recipes
    from moqe_compile.quantize import prepare_for_quantization
    from moqe_compile.quantize import sequential
    from moqe_compile.tasks.image.config import ExpertRecipe, load_recipe
    from moqe_compile.tasks.image.data import build_splits
    from moqe_compile.tasks.image.experts import build_expert
    from moqe_compile.tasks.image.model import load_fp_model
    from moqe_compile.tasks.image.preprocess import Preprocess

    cfg = load_recipe(Path(recipe_name) if Path(recipe_name).is_file() else recipes.path(recipe_name))
    fp = load_fp_model(cfg.model, cfg.preprocessing, work / "fp.onnx")
    calib = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))["calibration"].x[:32]
    prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
    got: list[dict] = []

    def keep(q, inits, block, x_in, target, fp_weights, qmax, settings, desc="", region=None):
        if len(got) < n_blocks:  # a frozen copy: the pass goes on editing q
            qc = onnx.ModelProto()
            qc.CopyFrom(q)
            got.append({"q": qc, "block": block, "x": x_in.copy(), "t": target.copy(), "fpw": fp_weights,
                        "qmax": qmax, "desc": desc})
        return {"edited": [], "error_before": None, "error_after": None, "iters": 0}

    real = sequential.reconstruct
    sequential.reconstruct = keep
    try:
        r = ExpertRecipe.from_preset("capture", "w4a8-brecq", block_samples=32, block_iters=1)
        build_expert(prepared, fp.input_name, calib, r, ["onnxruntime-cpu"], {"onnxruntime-cpu": work / "e.onnx"},
                     work / "e.json", work)
    finally:
        sequential.reconstruct = real
    return got


def step_seconds(b: dict, steps: int) -> float:
    import torch

    from moqe_compile.quantize import brecq

    inits = {i.name: i for i in b["q"].graph.initializer}
    region = brecq.Region(b["q"], inits, b["block"])
    layers = brecq._layers(b["q"], inits, region, b["fpw"], b["qmax"])  # noqa: SLF001
    x, t = torch.from_numpy(b["x"]), torch.from_numpy(b["t"])
    opt = torch.optim.Adam([l.v for l in layers], lr=1e-2)

    def step():
        out = region.run(x[:32], {l.dq_out: l.soft() for l in layers})
        loss = ((out - t[:32]) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up: oneDNN primitive creation
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def block_errors(b: dict) -> dict:
    """The captured block's output error (squared, summed over channels, mean over 32 views)
    with FP weights, and with the graph's nearest-rounded integers; and the target's energy."""
    import torch

    from moqe_compile.quantize import brecq

    inits = {i.name: i for i in b["q"].graph.initializer}
    region = brecq.Region(b["q"], inits, b["block"])
    convs = [n.name for n in region.nodes if n.op_type in ("Conv", "Gemm") and n.name in b["fpw"]]
    layers = brecq._layers(b["q"], inits, region, b["fpw"], b["qmax"])  # noqa: SLF001
    x, t = torch.from_numpy(b["x"][:32]), torch.from_numpy(b["t"][:32])
    fp = {l.dq_out: torch.from_numpy(b["fpw"][n].astype(np.float32)) for l, n in zip(layers, convs)}
    with torch.no_grad():
        def err(soft):
            return float(((region.run(x, soft) - t) ** 2).sum(1).mean())
        return {"fp_weights": err(fp), "nearest": err({}), "target_energy": float((t ** 2).sum(1).mean())}


def main() -> int:
    import torch

    from moqe_compile.quantize import brecq

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="a shipped image recipe name or a TOML path")
    ap.add_argument("--blocks", type=int, default=4, help="the first this-many blocks (the largest activations)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--errors", action="store_true",
                    help="instead of timing: each block's output error with FP and with nearest-rounded weights")
    add_json_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="moqe-brecq-step-") as tmp:
        blocks = capture_blocks(args.recipe, args.blocks, Path(tmp))
    fused = brecq._quantize  # noqa: SLF001
    variants = {"separate ops, NCHW": (separate_ops_quantize, False), "fused, NCHW": (fused, False),
                "fused, NHWC": (fused, True)}
    rows = []
    if args.errors:
        for b in blocks:
            e = block_errors(b)
            rows.append({"block": b["desc"], **e})
            print(f"{b['desc']}: output error with FP weights {e['fp_weights']:.4g}, nearest-rounded "
                  f"{e['nearest']:.4g}; target energy {e['target_energy']:.4g}", flush=True)
        write_json(args.json, {"recipe": args.recipe, "errors": rows})
        return 0
    try:
        for b in blocks:
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for name, (quantize, nhwc) in variants.items():
                    brecq._quantize, brecq.Region.channels_last = quantize, nhwc  # noqa: SLF001
                    times[name].append(step_seconds(b, args.steps))
            med = {k: float(np.median(v)) for k, v in times.items()}
            rows.append({"block": b["desc"], "input": list(b["x"].shape[1:]), "seconds_per_step": med})
            print(f"{b['desc']} input {tuple(b['x'].shape[1:])}: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items())
                  + f" ({med['separate ops, NCHW'] / med['fused, NHWC']:.1f}x)", flush=True)
    finally:
        brecq._quantize, brecq.Region.channels_last = fused, True  # noqa: SLF001
    write_json(args.json, {"recipe": args.recipe, "threads": args.threads, "steps": args.steps,
                           "rounds": args.rounds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
