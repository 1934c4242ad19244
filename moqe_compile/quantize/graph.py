"""Small ONNX-graph helpers for the weight-level recipes (ours, not ORT's: ORT exposes no API
to set integer weights, equalize layers or correct biases, so we edit initializers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from moqe_compile.backends.onnxruntime_cpu import session


@dataclass
class WeightLayer:
    node: str  # node name
    op: str  # Conv | Gemm
    weight: str  # initializer name; output channels on axis 0
    bias: str | None
    input: str  # activation tensor feeding the layer
    output: str
    attrs: dict


def node_attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def weight_layers(model: onnx.ModelProto) -> list[WeightLayer]:
    """Conv and Gemm(transB=1) nodes whose weight is an initializer, in graph order."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        a = node_attrs(n)
        if n.op_type == "Conv" and n.input[1] in inits:
            pass
        elif n.op_type == "Gemm" and n.input[1] in inits and a.get("transB", 0) == 1 and not a.get("transA", 0):
            pass
        else:
            continue
        bias = n.input[2] if len(n.input) > 2 and n.input[2] in inits else None
        out.append(WeightLayer(n.name, n.op_type, n.input[1], bias, n.input[0], n.output[0], a))
    return out


def get_init(model: onnx.ModelProto, name: str) -> np.ndarray:
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    raise KeyError(name)


def set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i in model.graph.initializer:
        if i.name == name:
            i.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(i).dtype), name))
            return
    raise KeyError(name)


def run_with_outputs(model: onnx.ModelProto | Path, names: list[str], input_name: str, x: np.ndarray,
                     batch: int = 16) -> dict[str, list[np.ndarray]]:
    """Run ``model`` on ``x`` returning the named intermediate tensors, per batch."""
    m = onnx.load(str(model)) if isinstance(model, Path) else onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in m.graph.output}
    for nm in names:
        if nm not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(nm))
    sess = session(m.SerializeToString(), name="intermediate outputs")
    out: dict[str, list[np.ndarray]] = {nm: [] for nm in names}
    for i in range(0, len(x), batch):
        res = sess.run(names, {input_name: x[i : i + batch]})
        for nm, r in zip(names, res):
            out[nm].append(r)
    return out
