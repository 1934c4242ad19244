"""Prove an expert runs as integer kernels: let ORT optimize it, save that graph, count ops.

A Q/DQ graph can silently execute as DequantizeLinear -> float Conv; only the optimized
graph ORT actually runs tells the truth.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

FLOAT_COMPUTE = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")
INT_COMPUTE = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "MatMulNBits")


def optimized_op_counts(model: Path, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED) -> Counter:
    """Op-type histogram of the graph ORT CPU executes after its (extended) optimizations."""
    with tempfile.TemporaryDirectory(prefix="moqe-opt-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath)
    return Counter(n.op_type for n in g.graph.node)


def count_integer_kernels(model: Path) -> dict:
    c = optimized_op_counts(model)
    return {
        "integer": {k: c[k] for k in INT_COMPUTE if c[k]},
        "float": {k: c[k] for k in FLOAT_COMPUTE if c[k]},
    }
