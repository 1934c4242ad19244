"""Q/DQ graph checks per target, naming each offending node.

- onnxruntime-cpu: every Conv/Gemm/MatMul must run as an integer kernel in the graph ORT
  actually executes after optimization (a Q/DQ graph can silently run DequantizeLinear ->
  float Conv); we save that optimized graph and inspect it.
- tensorrt (also ONNX Runtime CUDA): opset >= 13; int8 Q/DQ; zero-points constant 0;
  scales constant and positive; activations per-tensor; weights per-channel on axis 0.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.checker import ValidationError

from moqe_compile.backends.onnxruntime_cpu import optimized_model_bytes
from moqe_compile.errors import BackendError, ConfigError, InputError

FLOAT_COMPUTE = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")
INT_COMPUTE = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "MatMulNBits")
TARGETS = ("onnxruntime-cpu", "tensorrt")


def optimized_graph(model: Path | bytes, optimization: str = "extended") -> onnx.ModelProto:
    """The graph ORT CPU executes after its (by default extended, machine-independent) optimizations."""
    return onnx.load_from_string(optimized_model_bytes(model, optimization))


def optimized_op_counts(model: Path) -> Counter:
    return Counter(n.op_type for n in optimized_graph(model).graph.node)


def count_integer_kernels(model: Path) -> dict:
    c = optimized_op_counts(model)
    return {"integer": {k: c[k] for k in INT_COMPUTE if c[k]}, "float": {k: c[k] for k in FLOAT_COMPUTE if c[k]}}


def load_model(path: Path) -> onnx.ModelProto:
    """The ONNX model at ``path`` (external data included), read once for every target; a path
    that is not a readable ONNX file is an InputError naming it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model {str(p)!r} does not exist.")
    if not p.is_file():  # a FIFO would block the read; a directory or device is no model
        raise InputError(f"model {str(p)!r} is not a regular file; pass an .onnx file.")
    if p.stat().st_size == 0:
        raise InputError(f"model {str(p)!r} is empty; pass an .onnx file.")
    try:
        m = onnx.load(str(p))
    except (DecodeError, ValidationError, OSError, ValueError) as e:  # the last three: its external data
        raise InputError(f"model {str(p)!r} is not a readable ONNX model ({e}); pass an .onnx file, with any "
                         "external data it names beside it.") from e
    if not m.HasField("graph") or not m.graph.node:  # a few bytes of anything may parse as a protobuf
        raise InputError(f"model {str(p)!r} holds no ONNX graph; pass an .onnx file.")
    return m


def _check_ort_cpu(model: onnx.ModelProto, path: Path, allow_float: int) -> tuple[list[str], dict]:
    try:
        g = optimized_graph(model.SerializeToString())
    except BackendError as e:  # ORT saw the bytes, not the file: name it
        raise BackendError(f"model {str(path)!r}: {e}") from e
    c = Counter(n.op_type for n in g.graph.node)
    kernels = {"integer": {k: c[k] for k in INT_COMPUTE if c[k]}, "float": {k: c[k] for k in FLOAT_COMPUTE if c[k]}}
    floats = [n for n in g.graph.node if n.op_type in FLOAT_COMPUTE]
    bad = [] if len(floats) <= allow_float else [
        f"node {n.name or '<unnamed>'!r} ({n.op_type}) runs in float after ORT optimization" for n in floats]
    if not kernels["integer"]:
        bad.append("no integer kernel in the optimized graph (is this a Q/DQ model?)")
    return bad, kernels


def _check_tensorrt(m: onnx.ModelProto) -> list[str]:
    bad = []
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        bad.append(f"model opset {opset} < 13 (per-channel Q/DQ needs 13)")
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        bad.append("no QuantizeLinear/DequantizeLinear nodes: not a Q/DQ model")
    for n in qdq:
        who = f"node {n.name or n.output[0]!r} ({n.op_type})"
        scale = inits.get(n.input[1])
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if n.domain not in ("", "ai.onnx"):
            bad.append(f"{who}: domain {n.domain!r}, TensorRT needs standard ONNX Q/DQ")
        if scale is None:
            bad.append(f"{who}: scale {n.input[1]!r} is not a constant")
        elif not np.all(scale > 0):
            bad.append(f"{who}: scale {n.input[1]!r} has non-positive values")
        if zp is None:  # an absent zero-point defaults to uint8 0, which TensorRT rejects too
            bad.append(f"{who}: zero-point missing or not constant (need an int8 constant 0)")
        else:
            if zp.dtype != np.int8:
                bad.append(f"{who}: zero-point dtype {zp.dtype}, TensorRT needs int8")
            if np.any(zp != 0):
                bad.append(f"{who}: zero-point {n.input[2]!r} is not 0 (TensorRT needs symmetric)")
        is_weight = n.op_type == "DequantizeLinear" and n.input[0] in inits
        if scale is not None and scale.size > 1:
            if not is_weight:
                bad.append(f"{who}: per-channel scale on an activation; TensorRT needs per-tensor")
            elif axis != 0:
                bad.append(f"{who}: weight quantized per-channel on axis {axis}; TensorRT needs axis 0")
        if is_weight and inits[n.input[0]].dtype != np.int8:
            bad.append(f"{who}: weight {n.input[0]!r} stored as {inits[n.input[0]].dtype}, need int8")
    return bad


def check_qdq(model: Path, target: str, allow_float: int = 0) -> dict:
    """``{"ok", "violations": [...], "kernels"?}``; violations name the offending node."""
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r} is not one of {list(TARGETS)}.")
    m = load_model(model)
    if target == "onnxruntime-cpu":
        bad, kernels = _check_ort_cpu(m, model, allow_float)
        return {"target": target, "ok": not bad, "violations": bad, "kernels": kernels}
    bad = _check_tensorrt(m)
    return {"target": target, "ok": not bad, "violations": bad}
