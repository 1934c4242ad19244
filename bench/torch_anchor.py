"""The issue's GPU anchor, measured on the machine at hand: torch FP16 MobileNetV2 (timm,
random weights: latency does not depend on them) with the input already on the GPU, eager
and replayed from a CUDA graph, batch 1 and 64. Puts bench/gpu_latency.py's ONNX Runtime
figures (which include the host-to-device copy) in context. Needs a GPU, torch and timm.

    python bench/torch_anchor.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import timm
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    model = timm.create_model("mobilenetv2_100", pretrained=False).cuda().half().eval()
    rows = []
    for b in [int(v) for v in args.batches.split(",")]:
        x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.half)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(5):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g):
            model(x)

        def eager():
            with torch.no_grad():
                model(x)

        def timed(fn):
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop)

        samples = {"eager": [], "graph": []}
        for _ in range(args.rounds):
            samples["eager"].append(timed(eager))
            samples["graph"].append(timed(g.replay))
        row = {"batch": b, **{f"{k}_ms": round(statistics.median(v), 4) for k, v in samples.items()}}
        rows.append(row)
        print(f"torch fp16 mobilenetv2_100 batch {b}: eager {row['eager_ms']:.3f} ms, CUDA graph {row['graph_ms']:.3f} ms")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "input": "on the GPU"}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
