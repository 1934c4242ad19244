"""The torch baseline on the GPU at hand: torch FP16 MobileNetV2 (timm, random weights:
latency does not depend on them) with the input already on the GPU, eager and replayed from a
CUDA graph, batch 1 and 64. Puts bench/gpu/latency.py's ONNX Runtime figures (which include
the host-to-device copy) in context. Needs a GPU, torch and timm.

    python bench/gpu/torch_baseline.py [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: bench/common.py importable
from common import NO_GPU, add_json_option, gpu_missing, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--rounds", type=int, default=30)
    add_json_option(ap)
    args = ap.parse_args(argv)
    import timm
    import torch

    if gpu_missing():
        return NO_GPU
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
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "input": "on the GPU"}
    write_json(args.json, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
