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


def _fp_model(path, K=K):
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


def _feed(rows, k=K, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, k)).astype(np.float32)


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


def _assert_fused_equal(q, k=K):
    before, after = onnx.load(str(q)), onnx.load(str(q))
    assert fuse_siblings(after) == 1 and _ops(after).count("MatMulNBits") == 2
    for rows in (1, 7):
        for y0, y1 in zip(_run(before, _feed(rows, k, rows)), _run(after, _feed(rows, k, rows))):
            np.testing.assert_array_equal(y1, y0)


def test_zero_points_of_an_odd_block_count_stay_with_their_columns(tmp_path):
    # K = 96 in blocks of 32: 3 blocks per column, so each column's packed 4-bit zero points end
    # in half a byte of padding; concatenating columns must keep every column's own bytes.
    q = tmp_path / "q.onnx"
    quantize_matmulnbits(_fp_model(tmp_path / "fp.onnx", K=96), q, "rtn", 4, 32, False, [])
    _assert_fused_equal(q, k=96)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, True), (8, True)])
def test_siblings_from_our_own_writer_fuse_exactly(tmp_path, bits, symmetric):
    from moqe_compile.quantize.gptq import gptq_onnx

    fp, q = _fp_model(tmp_path / "fp.onnx", K=96), tmp_path / "q.onnx"
    gptq_onnx(fp, q, [{"x": _feed(16, 96)}], bits, 32, 0.01, symmetric=symmetric)
    _assert_fused_equal(q, k=96)


def test_a_weight_read_elsewhere_is_kept(tmp_path):
    q = tmp_path / "q.onnx"
    quantize_matmulnbits(_fp_model(tmp_path / "fp.onnx"), q, "rtn", 4, 32, True, [])
    model = onnx.load(str(q))
    q_node, k_node = (next(n for n in model.graph.node if n.name == f"mm_{p}_Q4") for p in "qk")
    model.graph.node.append(helper.make_node("Identity", [q_node.input[2]], ["q_scales"]))  # read by a node
    model.graph.output.append(helper.make_tensor_value_info("q_scales", TensorProto.FLOAT, None))
    model.graph.output.append(helper.make_tensor_value_info(k_node.input[2], TensorProto.FLOAT, None))  # an output
    want = _run(model, _feed(3))
    assert fuse_siblings(model) == 1
    kept = {t.name for t in model.graph.initializer}
    assert q_node.input[2] in kept and k_node.input[2] in kept and q_node.input[1] not in kept
    for y0, y1 in zip(want, _run(model, _feed(3))):
        np.testing.assert_array_equal(y1, y0)


def test_fused_names_never_collide(tmp_path):
    q = tmp_path / "q.onnx"
    quantize_matmulnbits(_fp_model(tmp_path / "fp.onnx"), q, "rtn", 4, 32, True, [])
    model = onnx.load(str(q))
    names = "+".join(n.name for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[0] == "x")
    model.graph.node.append(helper.make_node("Identity", ["x"], [f"fused.{names}.out"], name=f"fused.{names}"))
    model.graph.output.append(helper.make_tensor_value_info(f"fused.{names}.out", TensorProto.FLOAT, None))
    want = _run(model, _feed(2))
    assert fuse_siblings(model) == 1
    nodes = [n.name for n in model.graph.node]
    outs = [o for n in model.graph.node for o in n.output]
    assert len(nodes) == len(set(nodes)) and len(outs) == len(set(outs))
    for y0, y1 in zip(want, _run(model, _feed(2))):
        np.testing.assert_array_equal(y1, y0)
