"""MoQE vs one expert on the GPU (ONNX Runtime CUDA through ``GpuRuntime``), with FP32 and
FP16 of the FP model beside the INT8 Q/DQ experts. Needs a GPU and onnxruntime-gpu.

    python bench/gpu/latency.py bundles/mobilenetv2-demo [--batches 1,64] [--json PATH]

Candidates, all timed interleaved round by round in one process on the same batch
(wall clock of the whole call: host->device copy, compute, device->host copy, syncs):
- ``moqe``: ``GpuRuntime.run`` (router, host grouping, experts on their streams);
- ``expert:<default>``: the bundle's default (best-on-validation) expert alone, the same
  path without the router: the target is moqe within 1.10x of it;
- ``copy_in``: the batch's host-to-device transfer alone (pinned staging, copy, sync), the
  floor under every candidate, which all take host arrays and return host arrays;
- ``router``: the router alone; ``fp32`` / ``fp16`` / ``fp16_nhwc`` (``prefer_nhwc``): the FP
  model through the same kind of session;
- with CUDA graphs (``--no-graphs`` leaves them out): ``moqe_graph``, ``expert_graph:<default>``,
  ``router_graph`` and ``fp16_nhwc_graph``, the same paths replaying ONNX Runtime CUDA graphs per batch size.
  Their outputs are checked against the plain GPU paths on a second, different batch of the
  same size, so a replay that read stale buffers would show;
- ``moqe_speculative`` (batches up to ``--speculate-below``): graphs, and every expert runs
  beside the router (K experts' GPU work for one expert's latency; ``GpuRuntime``).
ONNX Runtime's CUDA provider has no integer convolutions: the INT8
experts run as dequantize -> float conv, so compare MoQE with one expert, and INT8 with
FP16 only to see what fake quantization costs on this provider, never as a speed-up.

The batch comes from the bundle's test split (``report/eval_data.npz``) when present, else
from seeded noise; the expert usage of that batch is printed, since MoQE's cost depends on
how many experts a batch is spread over. MoQE outputs are checked against the CPU
``Runtime`` on the same batch (top-1 agreement, routing agreement).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-verify", action="store_true", help="skip sha256 checks and files the bench does not read "
                                                           "(a copy without report/, to carry less)")
    ap.add_argument("--no-cpu-check", action="store_true", help="skip the comparison with the CPU Runtime")
    ap.add_argument("--no-graphs", action="store_true", help="leave out the CUDA-graph candidates")
    ap.add_argument("--speculate-below", type=int, default=1,
                    help="moqe_speculative runs every expert beside the router on batches up to this size")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per candidate and batch size "
                                                        "(algorithm search, graph capture)")
    add_json_option(ap)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from moqe_compile.backends.cuda_device import CudaDevice
    from moqe_compile.backends.onnxruntime_cuda import OrtCudaSession, fp16_model, require_cuda_provider
    from moqe_compile.evaluate.latency import tile_batch, time_interleaved
    from moqe_compile.tasks.image.runtime_gpu import GpuRuntime

    require_cuda_provider()
    root = Path(args.bundle)
    manifest = json.loads((root / "manifest.json").read_text())
    if args.no_verify:
        def load(**kw):
            return GpuRuntime(root, manifest, device=dev, **kw)
    else:
        def load(**kw):
            return GpuRuntime.load(root, device=dev, **kw)
    dev = CudaDevice()
    moqe = load()
    best = manifest["routing"]["default_expert"]
    single = load(only_expert=best)
    router = moqe.router_session
    fp32 = OrtCudaSession("fp32", root / manifest["model"]["fp"]["path"], device=dev)
    graphed, graph_error = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        f16 = fp16_model(root / manifest["model"]["fp"]["path"], Path(tmp) / "fp16.onnx")
        fp16 = OrtCudaSession("fp16", f16, device=dev)
        # channels-last convolutions: the fastest FP16 configuration measured
        fp16_nhwc = OrtCudaSession("fp16_nhwc", f16, device=dev, provider_options={"prefer_nhwc": "1"})
        if not args.no_graphs:
            try:
                graphed = {"moqe_graph": load(cuda_graph=True),
                           f"expert_graph:{best}": load(only_expert=best, cuda_graph=True),
                           "fp16_nhwc_graph": OrtCudaSession("fp16_nhwc_graph", f16, device=dev, cuda_graph=True,
                                                             provider_options={"prefer_nhwc": "1"}),
                           "moqe_speculative": load(cuda_graph=True, speculate_below=args.speculate_below)}
            except Exception as e:  # noqa: BLE001 - report it; the plain candidates still run
                graph_error = f"{type(e).__name__}: {e}"
                print(f"CUDA-graph candidates left out: {graph_error}")
    info = {**moqe.describe(), "onnxruntime": ort.__version__, "bundle": str(root), "default_expert": best,
            "routed": moqe.routed}
    if graphed:
        info["graphs"] = graphed["moqe_graph"].describe().get("cuda_graphs")
        info["fp16_graph"] = ("on" if graphed["fp16_nhwc_graph"].cuda_graph
                              else f"refused: {graphed['fp16_nhwc_graph'].graph_error}")
    if graph_error:
        info["graph_error"] = graph_error
    print(json.dumps(info))

    eval_path = root / "report" / "eval_data.npz"
    pool, source = None, "noise"
    if eval_path.is_file() and eval_path.stat().st_size > 0:
        from moqe_compile.tasks.image.eval import load_eval_data

        pool = load_eval_data(eval_path, "test")[0]
        source = "test split"
    if pool is None:
        c, h, w = moqe.input_shape
        pool = np.random.default_rng(0).standard_normal((64, c, h, w), dtype=np.float32)

    results = {"meta": {**info, "input": source, "repeats": args.repeats, "warmup": args.warmup}, "batches": {}}
    cpu = None
    if not args.no_cpu_check:
        from moqe_compile import Runtime

        cpu = Runtime(root, manifest, "onnxruntime-cpu")
    from moqe_compile.backends.cuda_device import Buffers

    copy_bufs, copy_stream = Buffers(dev), dev.stream()

    def copy_in(x):  # what each run does before computing: pinned staging, host->device, sync
        h = copy_bufs.host_array("x", np.float32, x.shape)
        h[...] = x
        dev.copy(copy_bufs.device_ptr("x", x.nbytes), h.ctypes.data, x.nbytes, "h2d", copy_stream)
        dev.synchronize(copy_stream)

    for b in [int(s) for s in args.batches.split(",")]:
        x = tile_batch(pool, b)
        cands = {"moqe": lambda: moqe.run(x), f"expert:{best}": lambda: single.run(x), "fp32": lambda: fp32.run(x),
                 "fp16": lambda: fp16.run(x), "fp16_nhwc": lambda: fp16_nhwc.run(x)}
        if router is not None:
            cands["router"] = lambda: router.run(x)
        for name, obj in graphed.items():
            if name != "moqe_speculative" or b <= args.speculate_below:
                cands[name] = (lambda o=obj: o.run(x))
        cands["copy_in"] = lambda: copy_in(x)  # the transfer floor every candidate above pays
        if graphed and graphed["moqe_graph"].router_session is not None:
            cands["router_graph"] = lambda: graphed["moqe_graph"].router_session.run(x)
        for fn in cands.values():  # warm-up beyond time_interleaved's one call: cuDNN search, capture
            for _ in range(max(args.warmup - 1, 0)):
                fn()
        t = time_interleaved(cands, args.repeats)
        res = moqe.run(x)
        usage = {n: int((np.asarray(res.experts) == n).sum()) for n in moqe.expert_names}
        row = {"timing": t, "usage": usage,
               "moqe_over_expert": round(t["moqe"]["median_ms"] / t[f"expert:{best}"]["median_ms"], 3)}
        # where MoQE's time goes: the runtime's own split over a few calls
        splits = [moqe.run(x).timing_ms for _ in range(max(args.repeats // 3, 1))]
        row["moqe_split_ms"] = {k: round(float(np.median([sp[k] for sp in splits])), 3) for k in splits[0]}
        if graphed:
            row["graph_over_expert_graph"] = round(t["moqe_graph"]["median_ms"]
                                                   / t[f"expert_graph:{best}"]["median_ms"], 3)
            row["moqe_graph_over_expert"] = round(t["moqe_graph"]["median_ms"] / t[f"expert:{best}"]["median_ms"], 3)
            # a second, different batch of the same size: replays must read the new input
            x2 = np.ascontiguousarray(np.roll(x, 1, axis=0) * 0.9)
            plain, graph = moqe.run(x2), graphed["moqe_graph"].run(x2)
            row["graph_vs_plain"] = {
                "routing_agreement": float((plain.expert_index == graph.expert_index).mean()),
                "max_abs_logit_diff": float(np.abs(plain.logits - graph.logits).max()),
                "expert_max_abs_diff": float(np.abs(single.run(x2).logits
                                                    - graphed[f"expert_graph:{best}"].run(x2).logits).max()),
                "fp16_max_abs_diff": float(np.abs(fp16_nhwc.run(x2) - graphed["fp16_nhwc_graph"].run(x2)).max())}
            if b <= args.speculate_below:
                spec = graphed["moqe_speculative"].run(x2)
                row["speculative_vs_plain"] = {
                    "routing_agreement": float((plain.expert_index == spec.expert_index).mean()),
                    "max_abs_logit_diff": float(np.abs(plain.logits - spec.logits).max())}
                row["speculative_over_expert_graph"] = round(t["moqe_speculative"]["median_ms"]
                                                             / t[f"expert_graph:{best}"]["median_ms"], 3)
        if cpu is not None:
            ref = cpu.run(x)
            row["vs_cpu_runtime"] = {
                "routing_agreement": float((ref.expert_index == res.expert_index).mean()),
                "top1_agreement": float((ref.logits.argmax(1) == res.logits.argmax(1)).mean()),
                "max_abs_logit_diff": float(np.abs(ref.logits - res.logits).max())}
        results["batches"][str(b)] = row
        print(f"batch {b:>3}: " + "  ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in t.items())
              + f"  | moqe/expert {row['moqe_over_expert']:.3f}  usage {usage}  split {row['moqe_split_ms']}"
              + (f"  | graphs: moqe_graph/expert_graph {row['graph_over_expert_graph']:.3f} "
                 f"moqe_graph/expert {row['moqe_graph_over_expert']:.3f} vs plain {row['graph_vs_plain']}"
                 if graphed else "")
              + (f"  | vs CPU {row['vs_cpu_runtime']}" if cpu is not None else ""))
    if graphed:
        results["meta"]["graphs_after"] = graphed["moqe_graph"].describe().get("cuda_graphs")
    for s in (moqe, single, fp32, fp16, fp16_nhwc, *graphed.values()):
        s.close()
    copy_bufs.close()
    dev.destroy_stream(copy_stream)
    if cpu is not None:
        cpu.close()
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
