"""The fused router-attention kernel vs torch's scaled_dot_product_attention on the CV
router's shape (8 heads x head_dim 8 x 64 positions) at batch 1, 64 and 1024. Needs a GPU.

    python bench/gpu/router_attention.py [--dtype float16|float32] [--json PATH]

Each figure is the median over rounds of CUDA-event time per call, measured on one stream
with calls issued back to back (launch overhead included, as a router pays it). Kernel and
SDPA rounds are interleaved so clock drift hits both alike. The ``*_graph_ms`` columns time
the same calls captured in one CUDA graph (100 calls, replayed): GPU time without the
host's launch cost, the figure for a router that runs inside a graph. The target:
>= 3x faster than SDPA at batch 1024 and not slower at batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: bench/common.py importable
from common import NO_GPU, add_json_option, gpu_missing, write_json  # noqa: E402


def time_ms(fn, reps: int, torch) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / reps


def graph_time_ms(fn, rounds: int, torch, calls: int = 100) -> float:
    """Median over rounds of one replay of a graph holding ``calls`` back-to-back calls, per call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on the capture stream (SDPA picks its kernel here)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return statistics.median(time_ms(g.replay, 1, torch) for _ in range(rounds)) / calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=200, help="calls per round")
    ap.add_argument("--lib", default=None, help="libmoqe_router_attention.so (default: kernels/build, built if absent)")
    add_json_option(ap)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    if gpu_missing():
        return NO_GPU
    from moqe_compile.backends import kernels

    lib_path = args.lib or (kernels.KERNELS_DIR / "build" / kernels.LIB_NAME)
    if args.lib is None and not lib_path.is_file():
        lib_path = kernels.build("all")
    lib = kernels.load_router_attention(lib_path)
    dt = getattr(torch, args.dtype)
    tau = 0.35
    rows = []
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
          f"dtype {args.dtype}  shape (B, 8, 64, 8)")
    print(f"{'batch':>6} {'sdpa_ms':>9} {'v1_ms':>9} {'v2_ms':>9} {'auto_ms':>9} {'sdpa/auto':>9} {'max_err':>9}")
    for b in [int(x) for x in args.batches.split(",")]:
        q, k, v = (torch.randn(b, 8, 64, 8, device="cuda", dtype=dt) for _ in range(3))
        out = torch.empty_like(q)
        fp16 = kernels.FP16 if dt == torch.float16 else kernels.FP32

        def kern(version):  # the stream is read per call: graph capture runs on a side stream
            return lambda: lib.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, 8, 64, 8, tau,
                                   fp16, None, torch.cuda.current_stream().cuda_stream, version)

        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=tau),
               "v1": kern(1), "v2": kern(2), "auto": kern(0)}
        for fn in fns.values():  # warm-up: SDPA backend choice, module load
            for _ in range(20):
                fn()
        torch.cuda.synchronize()
        samples = {n: [] for n in fns}
        for _ in range(args.rounds):
            for n, fn in fns.items():
                samples[n].append(time_ms(fn, args.reps, torch))
        med = {n: statistics.median(s) for n, s in samples.items()}
        graph_ms = {}
        for n in ("sdpa", "auto"):
            try:
                graph_ms[n] = graph_time_ms(fns[n], args.rounds, torch)
            except Exception as e:  # noqa: BLE001 - the plain timings stand without it
                print(f"  CUDA-graph timing of {n} failed: {type(e).__name__}: {e}")
        kern(0)()
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=tau)
        err = (out.float() - want).abs().max().item()
        row = {"batch": b, **{f"{n}_ms": round(m, 5) for n, m in med.items()},
               "speedup_vs_sdpa": round(med["sdpa"] / med["auto"], 2), "max_abs_err_vs_sdpa_fp32": err,
               **{f"{n}_graph_ms": round(m, 5) for n, m in graph_ms.items()}}
        if len(graph_ms) == 2:
            row["graph_speedup_vs_sdpa"] = round(graph_ms["sdpa"] / graph_ms["auto"], 2)
        rows.append(row)
        print(f"{b:>6} {med['sdpa']:>9.4f} {med['v1']:>9.4f} {med['v2']:>9.4f} {med['auto']:>9.4f} "
              f"{row['speedup_vs_sdpa']:>9.2f} {err:>9.1e}"
              + (f"   graph: sdpa {graph_ms['sdpa']:.4f} auto {graph_ms['auto']:.4f} "
                 f"x{row['graph_speedup_vs_sdpa']:.2f}" if len(graph_ms) == 2 else ""))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "dtype": args.dtype, "rounds": args.rounds, "reps": args.reps, "library": str(lib.path)}
    write_json(args.json, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
