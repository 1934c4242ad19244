"""Sibling MatMulNBits fused into one node + Split: the same outputs, bit for bit, and only where
the arithmetic agrees."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moqe_compile.quantize.nbits import quantize_matmulnbits, set_accuracy_level
from moqe_compile.quantize.nbits_fuse import fuse_siblings, fuse_siblings_file, sibling_groups

K = 128
WIDTHS = {"q": 96, "k": 32, "v": 32, "o": 64}  # q/k/v read x; o reads relu(x)


def _fp_model(path):
    """q/k/v MatMuls on ``x`` and one on another tensor, every output a graph output."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    inits, outs = [], []
    for name, n in WIDTHS.items():
        inits.append(numpy_helper.from_array((rng.normal(size=(K, n)) * 0.1).astype(np.float32), f"w_{name}"))
        nodes.append(helper.make_node("MatMul", ["r" if name == "o" else "x", f"w_{name}"], [f"y_{name}"],
                                      name=f"mm_{name}"))
        outs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["M", n]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])], outs, inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _run(model, x):
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("method,symmetric", [("rtn", True), ("rtn", False), ("hqq", False)])
@pytest.mark.parametrize("level", [0, 4])
def test_fused_siblings_give_the_same_outputs_bit_for_bit(tmp_path, method, symmetric, level):
    q = tmp_path / "q.onnx"
    quantize_matmulnbits(_fp_model(tmp_path / "fp.onnx"), q, method, 4, 32, symmetric, [])
    set_accuracy_level(q, level)
    before = onnx.load(str(q))
    after = onnx.load(str(q))
    assert fuse_siblings(after) == 1
    assert _ops(after).count("MatMulNBits") == 2 and _ops(after).count("Split") == 1
    fused = next(n for n in after.graph.node if n.op_type == "MatMulNBits" and n.input[0] == "x")
    assert {a.name: helper.get_attribute_value(a) for a in fused.attribute}["N"] == 96 + 32 + 32
    for rows in (1, 16):
        x = np.random.default_rng(rows).normal(size=(rows, K)).astype(np.float32)
        for y0, y1 in zip(_run(before, x), _run(after, x)):
            np.testing.assert_array_equal(y1, y0)


def test_siblings_of_other_widths_or_levels_stay_apart(tmp_path):
    fp, q = _fp_model(tmp_path / "fp.onnx"), tmp_path / "q.onnx"
    quantize_matmulnbits(fp, q, "rtn", 4, 32, True, ["mm_v"])
    quantize_matmulnbits(q, q, "rtn", 8, 32, True, ["mm_q", "mm_k", "mm_o"])  # v at 8 bits
    groups = sibling_groups(onnx.load(str(q)))
    assert [[n.name for n in ns] for ns in groups] == [["mm_q_Q4", "mm_k_Q4"]]
    set_accuracy_level(q, 0, 4)  # the 8-bit v gets level 4; q and k keep 0: still the one pair
    assert len(sibling_groups(onnx.load(str(q)))) == 1
    model = onnx.load(str(q))
    for n in model.graph.node:  # k at another level than q: nothing left to fuse
        if n.name == "mm_k_Q4":
            n.attribute.append(helper.make_attribute("accuracy_level", 4))
    assert sibling_groups(model) == []


def test_fusing_a_file_twice_changes_nothing_the_second_time(tmp_path):
    q = tmp_path / "q.onnx"
    quantize_matmulnbits(_fp_model(tmp_path / "fp.onnx"), q, "rtn", 4, 32, True, [])
    assert fuse_siblings_file(q) == 1
    data = q.read_bytes()
    assert fuse_siblings_file(q) == 0 and q.read_bytes() == data
    model = onnx.load(str(q))
    onnx.checker.check_model(model)
    read = {i for n in model.graph.node for i in n.input}
    assert all(t.name in read for t in model.graph.initializer)  # the siblings' old tensors are gone


def test_float_siblings_are_fused_only_when_asked(tmp_path):
    fp = onnx.load(str(_fp_model(tmp_path / "fp.onnx")))
    assert fuse_siblings(onnx.load(str(tmp_path / "fp.onnx"))) == 0  # the build's default: MatMulNBits only
    fused = onnx.load(str(tmp_path / "fp.onnx"))
    assert fuse_siblings(fused, float_matmuls=True) == 1
    assert _ops(fused).count("MatMul") == 2
    x = np.random.default_rng(3).normal(size=(5, K)).astype(np.float32)
    for y0, y1 in zip(_run(fp, x), _run(fused, x)):
        np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)  # float sums: same terms, maybe another order
