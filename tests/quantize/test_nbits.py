"""MatMulNBits' accuracy_level: set on every node, outputs equivalent to float compute."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moqe_compile.quantize.nbits import check_kernels, quantize_matmulnbits, set_accuracy_level

K, N = 128, 96


def _fp_model(path, seed=0):
    w = (np.random.default_rng(seed).normal(size=(K, N)) * 0.1).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                           helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", K])],
                          [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(np.ascontiguousarray(w.T), "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _levels(path):
    return [next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
            for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("method,symmetric", [("rtn", True), ("rtn", False), ("hqq", False)])
def test_accuracy_level_4_is_set_everywhere_and_keeps_outputs(tmp_path, method, symmetric):
    fp = _fp_model(tmp_path / "fp.onnx")
    q0, q4 = tmp_path / "q0.onnx", tmp_path / "q4.onnx"
    quantize_matmulnbits(fp, q0, method, 4, 32, symmetric, [])
    quantize_matmulnbits(fp, q4, method, 4, 32, symmetric, [])
    assert set_accuracy_level(q4, 4) == 2 and _levels(q4) == [4, 4] and _levels(q0) == [0, 0]
    assert check_kernels(q4)["matmulnbits_accuracy_levels"] == {"4": 2}
    x = np.random.default_rng(1).normal(size=(16, K)).astype(np.float32)
    ref, y0, y4 = _run(fp, x), _run(q0, x), _run(q4, x)
    scale = np.abs(ref).max()
    # int8 activations add little to the 4-bit weights' own error, measured against the FP model
    err0, err4 = np.abs(y0 - ref).max() / scale, np.abs(y4 - ref).max() / scale
    assert err4 < max(2 * err0, 0.02), (err0, err4)
    assert np.abs(y4 - y0).max() / scale < 0.05
    assert set_accuracy_level(q4, 0) == 2 and _levels(q4) == [0, 0]  # 0 removes it again
    np.testing.assert_array_equal(_run(q4, x), y0)


def test_the_8_bit_nodes_get_their_own_level(tmp_path):
    # mm1 at 4 bits, mm2 at 8 (as an LM expert's head): ORT has no fast float-compute kernel for
    # 8-bit MatMulNBits, so the recipe's accuracy_level_8bit is written on those nodes.
    fp, q = _fp_model(tmp_path / "fp.onnx"), tmp_path / "q.onnx"
    quantize_matmulnbits(fp, q, "rtn", 4, 32, True, ["mm2"])
    quantize_matmulnbits(q, q, "rtn", 8, 32, True, ["mm1"])
    assert set_accuracy_level(q, 0, 4) == 2 and _levels(q) == [0, 4]
    assert check_kernels(q)["matmulnbits_accuracy_levels"] == {"0": 1, "4": 1}
    assert set_accuracy_level(q, 4, 0) == 2 and _levels(q) == [4, 4]  # 0: the 8-bit nodes follow the level
    assert set_accuracy_level(q, 0) == 2 and _levels(q) == [0, 0]


def test_accuracy_level_is_checked_in_the_recipe():
    from moqe_compile.errors import ConfigError
    from moqe_compile.tasks.causal_lm.config import expert_from_dict

    assert expert_from_dict({"name": "a", "preset": "w4-rtn"}).accuracy_level == 0
    assert expert_from_dict({"name": "a", "preset": "w4-rtn", "accuracy_level": 4}).accuracy_level == 4
    with pytest.raises(ConfigError, match="accuracy_level = 5"):
        expert_from_dict({"name": "a", "preset": "w4-rtn", "accuracy_level": 5})


def test_accuracy_level_reaches_the_manifest_only_when_set():
    from moqe_compile.tasks.causal_lm.config import LMBuildConfig, expert_from_dict

    cfg = LMBuildConfig(experts=[expert_from_dict({"name": "a", "preset": "w4-rtn", "accuracy_level": 4}),
                                 expert_from_dict({"name": "b", "preset": "w4-hqq"})])
    written = cfg.to_manifest()["_data"]["experts"]
    assert written[0]["accuracy_level"] == 4 and "accuracy_level" not in written[1]
    assert LMBuildConfig.from_manifest(cfg.to_manifest()) == cfg
