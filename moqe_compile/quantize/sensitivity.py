"""Layer sensitivity: quantize one layer at a time (INT8 U8S8, MinMax; ORT's
``nodes_to_quantize`` names that one Conv/Gemm, so no other node is quantized) and measure
how far the model output moves from FP (mean KL, top-1 agreement). The most sensitive layers are the
candidates to keep in FP (``exclude_sensitive`` / ``nodes_to_exclude``, as ModelOpt does)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moqe_compile.backends.onnxruntime_cpu import session
from moqe_compile.quantize.calibrate import calibrate_ranges
from moqe_compile.quantize.graph import weight_layers
from moqe_compile.quantize.qdq import write_expert


def _run(path: Path, input_name: str, x: np.ndarray) -> np.ndarray:
    s = session(path, name=path.name)
    return np.concatenate([s.run(None, {input_name: x[i : i + 32]})[0] for i in range(0, len(x), 32)])


def layer_sensitivity(prepared: Path, input_name: str, x: np.ndarray, work: Path,
                      divergence: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int = 64,
                      show_progress: bool = True) -> list[dict]:
    """Layers sorted from most to least sensitive. ``divergence(outputs, fp_outputs)``: the
    per-sample distance of a quantized model's outputs from FP's (e.g. KL to FP)."""
    import onnx

    x = x[:n]
    ranges = calibrate_ranges(prepared, input_name, x, work / "sensitivity.ranges.json", method="minmax")
    fp = _run(prepared, input_name, x)
    layers = weight_layers(onnx.load(str(prepared)))
    out = []
    for l in tqdm(layers, desc="sensitivity", disable=not show_progress, leave=False):
        q = work / "sensitivity.one.onnx"
        # Only this node: excluding the other weight layers would still let ORT quantize
        # Add, pooling, Flatten... in every run and blur the per-layer measure.
        write_expert(prepared, ranges, "onnxruntime-cpu", q, method="minmax", only=[l.node])
        y = _run(q, input_name, x)
        out.append({"node": l.node, "op": l.op, "kl_to_fp": float(divergence(y, fp).mean()),
                    "fp_top1_agreement": float((y.argmax(-1) == fp.argmax(-1)).mean())})
    return sorted(out, key=lambda r: -r["kl_to_fp"])
