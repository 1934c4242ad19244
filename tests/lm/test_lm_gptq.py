"""Our GPTQ -> MatMulNBits: packing matches ORT's kernel, GPTQ beats RTN on the layer objective."""

from __future__ import annotations

import numpy as np
import pytest

from moqe_compile.quantize.lm_gptq import gptq_onnx, gptq_weight


def _matmul_model(path, W):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    K, N = W.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])],
                          [numpy_helper.from_array(W, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.parametrize("bits,K,symmetric", [(4, 64, True), (8, 64, True), (4, 48, True),  # 48: padded
                                              (4, 64, False), (8, 64, False), (4, 96, False)])  # 96: 3 blocks, odd
def test_matmulnbits_packing_and_gptq_gain(tmp_path, bits, K, symmetric):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    N, group = 24, 32
    W = rng.normal(size=(K, N)).astype(np.float32)
    mix = rng.normal(size=(K, K)).astype(np.float32)  # correlated inputs: where GPTQ helps
    X = (rng.normal(size=(512, K)) @ mix).astype(np.float32)
    _matmul_model(tmp_path / "fp.onnx", W)
    info = gptq_onnx(tmp_path / "fp.onnx", tmp_path / "q.onnx", [{"x": X[i : i + 128]} for i in range(0, 512, 128)],
                     bits, group, 0.01, symmetric=symmetric)
    assert info["matmuls"] == 1
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    assert [n.op_type for n in __import__("onnx").load(str(tmp_path / "q.onnx")).graph.node] == ["MatMulNBits"]
    got = sess.run(None, {"x": X})[0]
    # Reference: the same GPTQ codes and scales, dequantized in numpy.
    pad = (-K) % group
    Wp = np.pad(W, ((0, pad), (0, 0)))
    H = 2 * np.pad(X, ((0, 0), (0, pad))).T.astype(np.float64) @ np.pad(X, ((0, 0), (0, pad))) / len(X)
    H[K:, K:] += np.eye(pad)
    q, s, z = gptq_weight(Wp.T, H, bits, group, 0.01, symmetric=symmetric)
    assert (z is None) == symmetric
    zp = 0 if symmetric else z[..., None]
    deq = ((q.reshape(N, -1, group) - zp) * s[..., None]).reshape(N, -1)[:, :K]
    assert np.allclose(got, X @ deq.T, rtol=1e-3, atol=1e-3 * np.abs(got).max())
    # GPTQ vs round-to-nearest with per-group absmax scales on the layer's output error.
    qmax = 2 ** (bits - 1) - 1
    Wt = Wp.T.reshape(N, -1, group)
    sc = np.abs(Wt).max(-1, keepdims=True) / qmax
    rtn = (np.clip(np.round(Wt / sc), -qmax, qmax) * sc).reshape(N, -1)[:, :K]
    err = lambda Wq: float(((X @ (W - Wq.T)) ** 2).mean())  # noqa: E731
    assert err(deq) < err(rtn)
    if not symmetric:  # every level used: codes span [0, 2^b - 1]
        assert q.min() == 0 and q.max() == 2**bits - 1
