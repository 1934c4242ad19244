"""The one GPTQ core through both front ends: results pinned on fixed random inputs, and the
MatMulNBits graph it writes (packing matches ORT's kernel, GPTQ beats RTN on the layer objective).

The pinned figures were recorded from the two separate implementations the core replaced
(per-output-channel Q/DQ rounding for Conv/Gemm, blockwise MatMulNBits rounding for MatMul),
so merging them changed no result."""

from __future__ import annotations

import numpy as np
import pytest

from moqe_compile.errors import BuildError
from moqe_compile.quantize.gptq import (
    ChannelGrid,
    LayerHessian,
    gptq_blockwise,
    gptq_clip_search,
    gptq_onnx,
    gptq_quantize,
    gptq_round,
    row_errors,
)
from moqe_compile.quantize.weights import channel_scales
from moqe_compile.quantize.nbits import graph_weight_bits

CONV = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 2}


def _checksum(q: np.ndarray) -> tuple[int, int, int]:
    """(sum, sum of squares, position-weighted sum) of integer codes."""
    f = q.reshape(-1).astype(np.int64)
    return int(f.sum()), int((f * f).sum()), int((f * (np.arange(f.size) % 97 + 1)).sum())


def _conv_case():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    x = rng.normal(size=(16, 8, 6, 6)).astype(np.float32)
    x[:, 3] = 0.0  # a dead input channel
    h = LayerHessian("Conv", CONV, w.shape)
    for i in range(0, 16, 8):
        h.add(x[i : i + 8])
    return w, h


def _gemm_inputs():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(10, 40)).astype(np.float32)
    return w, (rng.normal(size=(200, 40)) @ rng.normal(size=(40, 40))).astype(np.float32)


def _gemm_case():
    w, x = _gemm_inputs()
    h = LayerHessian("Gemm", {}, w.shape)
    h.add(x)
    return w, h


# Recorded from the code before the merge: (checksum of the codes, total output error). The
# errors are the recorded ones divided by the true row count (576 im2col rows, 200 Gemm rows):
# the old accumulator counted groups x batches as its rows (see test_hessian_counts_rows).
CHANNEL_EXPECTED = {
    ("conv", 7): ((-30, 3038, -996), 219.20545428316325 * 4 / 576),
    ("gemm", 7): ((-129, 4115, -6723), 11025.786294960335 / 200),
    ("gemm", 63): ((-917, 253443, -48840), 188.59509119679237 / 200),
}
CLIP_EXPECTED = ((-143, 4249, -7227), 2.9158053547143936, 10388.341525544593 / 200)


def test_hessian_counts_rows_and_row_errors_are_the_mean_output_error():
    w, h = _gemm_case()
    assert h.rows == 200
    _, hc = _conv_case()
    assert hc.rows == 16 * 6 * 6  # im2col rows, not groups x batches
    _, x = _gemm_inputs()
    s = channel_scales(w, 7, "minmax")
    q = gptq_round(w, s, 7, h)
    e = x.astype(np.float64) @ (w - q * s[:, None]).T.astype(np.float64)
    np.testing.assert_allclose(row_errors(w, q, s, h), (e**2).mean(0), rtol=1e-4)


@pytest.mark.parametrize("case,qmax", list(CHANNEL_EXPECTED))
def test_per_channel_front_end_is_unchanged(case, qmax):
    w, h = _conv_case() if case == "conv" else _gemm_case()
    s = channel_scales(w, qmax, "mse")
    q = gptq_round(w, s, qmax, h)
    assert q.dtype == np.int32 and q.shape == w.shape
    sums, err = CHANNEL_EXPECTED[(case, qmax)]
    assert _checksum(q) == sums
    assert float(row_errors(w, q, s, h).sum()) == pytest.approx(err, rel=1e-6)


def test_clip_search_front_end_is_unchanged():
    w, h = _gemm_case()
    full = channel_scales(w, 7, "minmax")
    q, s = gptq_clip_search(w, 7, h, [channel_scales(w, 7, "mse")] + [f * full for f in (0.8, 0.9, 1.0)])
    sums, scale_sum, err = CLIP_EXPECTED
    assert _checksum(q) == sums
    assert float(s.astype(np.float64).sum()) == pytest.approx(scale_sum, rel=1e-6)
    assert float(row_errors(w, q, s, h).sum()) == pytest.approx(err, rel=1e-6)


def _blockwise_case(K: int):
    rng = np.random.default_rng(2)
    W = rng.normal(size=(24, K)).astype(np.float32)
    X = rng.normal(size=(300, K)) @ rng.normal(size=(K, K))
    X[:, 5] = 0.0  # a dead input
    return W, 2.0 * X.T @ X / len(X)


# (bits, K, symmetric) -> (checksum of codes, sum of scales, checksum of zero points or None)
BLOCK_EXPECTED = {
    (4, 64, True): ((-285, 13961, -14865), 16.472713261842728, None),
    (8, 64, True): ((-4760, 4523190, -247249), 0.9023895133286715, None),
    (4, 96, False): ((17355, 163213, 852114), 19.850328013300896, (556, 4406, 20611)),
    (3, 128, False): ((10571, 45871, 513069), 58.12041416764259, (336, 1206, 16137)),
}


@pytest.mark.parametrize("bits,K,symmetric", list(BLOCK_EXPECTED))
def test_blockwise_front_end_is_unchanged(bits, K, symmetric):
    W, H = _blockwise_case(K)
    q, s, z = gptq_blockwise(W, H, bits, 32, 0.01, symmetric=symmetric)
    sums, scale_sum, zsums = BLOCK_EXPECTED[(bits, K, symmetric)]
    assert q.shape == W.shape and s.shape == (24, K // 32)
    assert _checksum(q) == sums
    assert float(s.astype(np.float64).sum()) == pytest.approx(scale_sum, rel=1e-5)
    assert (z is None) == symmetric
    if z is not None:
        assert _checksum(z) == zsums


def test_hessian_without_rows_is_refused():
    from moqe_compile.quantize.gptq import GroupGrid

    with pytest.raises(BuildError, match="no calibration rows"):
        gptq_round(np.ones((2, 3), np.float32), np.ones(2, np.float32), 7, LayerHessian("Gemm", {}, (2, 3)))
    assert not ChannelGrid.fits_scales and GroupGrid.fits_scales


def _rtn_asym(W, bits, group):
    """Round to nearest on each group's [min, max] (widened to 0), zero point per group: numpy."""
    N, K = W.shape
    g = W.reshape(N, K // group, group).astype(np.float64)
    lo, hi = np.minimum(g.min(-1, keepdims=True), 0), np.maximum(g.max(-1, keepdims=True), 0)
    s = np.maximum((hi - lo) / (2**bits - 1), 1e-10)
    z = np.round(-lo / s)
    q = np.clip(np.round(g / s) + z, 0, 2**bits - 1)
    return ((q - z) * s).reshape(N, K)


def _deq(q, s, z, group):
    N, K = q.shape
    return ((q.reshape(N, -1, group) - z[..., None]) * s[..., None]).reshape(N, K)


def test_act_order_with_a_diagonal_hessian_is_round_to_nearest():
    # No off-diagonal H: no error to feed back, so whatever the column order, every column is
    # rounded alone on its own group's scale, fitted on the original weights (static groups).
    rng = np.random.default_rng(3)
    W = rng.normal(size=(16, 128)).astype(np.float32)
    H = np.diag(rng.uniform(0.1, 10.0, 128))  # a column order far from the natural one
    q, s, z = gptq_blockwise(W, H, 4, 32, 0.01, symmetric=False, act_order=True)
    assert np.allclose(_deq(q, s, z, 32), _rtn_asym(W, 4, 32), atol=1e-5)


def test_act_order_with_static_groups_beats_round_to_nearest_on_the_layer_objective():
    rng = np.random.default_rng(4)
    K, N = 256, 32
    W = rng.normal(size=(N, K)).astype(np.float32)
    # Correlated inputs with a few large channels (activation outliers): where act-order pays.
    X = rng.normal(size=(1024, K)) @ rng.normal(size=(K, K)) * 0.1
    X[:, rng.choice(K, 8, replace=False)] *= 20
    H = X.T @ X / len(X)

    def err(Wq):
        E = (W - Wq).astype(np.float64)
        return float(np.einsum("nk,kl,nl->", E, H, E))

    ordered = gptq_blockwise(W, H, 4, 128, 0.01, symmetric=False)
    acted = gptq_blockwise(W, H, 4, 128, 0.01, symmetric=False, act_order=True)
    rtn = err(_rtn_asym(W, 4, 128))
    assert err(_deq(*ordered, 128)) < rtn
    assert err(_deq(*acted, 128)) < 0.5 * err(_deq(*ordered, 128))  # measured 585 vs 1776 (RTN 2989)


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
                                              (4, 64, False), (8, 64, False), (4, 96, False),  # 96: 3 blocks, odd
                                              (3, 64, True), (3, 96, False)])  # 3 bits in 4-bit codes
def test_matmulnbits_packing_and_gptq_gain(tmp_path, bits, K, symmetric):
    import onnx
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
    node, = onnx.load(str(tmp_path / "q.onnx")).graph.node
    assert node.op_type == "MatMulNBits"
    assert {a.name: a.i for a in node.attribute}["bits"] == (4 if bits == 3 else bits)  # ORT's kernel widths
    assert graph_weight_bits(tmp_path / "q.onnx")["mean_weight_bits"] == bits  # the grid, not the storage
    got = sess.run(None, {"x": X})[0]
    # Reference: the same GPTQ codes and scales, dequantized in numpy.
    pad = (-K) % group
    Wp = np.pad(W, ((0, pad), (0, 0)))
    H = 2 * np.pad(X, ((0, 0), (0, pad))).T.astype(np.float64) @ np.pad(X, ((0, 0), (0, pad))) / len(X)
    H[K:, K:] += np.eye(pad)
    q, s, z = gptq_blockwise(Wp.T, H, bits, group, 0.01, symmetric=symmetric)
    assert (z is None) == symmetric
    zp = 0 if symmetric else z[..., None]
    deq = ((q.reshape(N, -1, group) - zp) * s[..., None]).reshape(N, -1)[:, :K]
    assert np.allclose(got, X @ deq.T, rtol=1e-3, atol=1e-3 * np.abs(got).max())
    # GPTQ vs round-to-nearest with per-group absmax scales on the layer's output error.
    qmax = 2 ** (bits - 1) - 1
    Wt = Wp.T.reshape(N, -1, group)
    sc = np.abs(Wt).max(-1, keepdims=True) / qmax
    rtn = (np.clip(np.round(Wt / sc), -qmax, qmax) * sc).reshape(N, -1)[:, :K]

    def err(Wq):
        return float(((X @ (W - Wq.T)) ** 2).mean())

    assert err(deq) < err(rtn)
    if not symmetric:  # every level used: codes span [0, 2^b - 1]
        assert q.min() == 0 and q.max() == 2**bits - 1


@pytest.mark.parametrize("bits", [3, 4])
def test_nearest_writes_round_to_nearest_on_the_same_grids(tmp_path, bits):
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    W = rng.normal(size=(64, 24)).astype(np.float32)
    X = rng.normal(size=(8, 64)).astype(np.float32)
    _matmul_model(tmp_path / "fp.onnx", W)
    info = gptq_onnx(tmp_path / "fp.onnx", tmp_path / "q.onnx", [], bits, 32, 0.01, symmetric=False, nearest=True)
    assert info["calibration_tokens"] == 0
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    deq = _rtn_asym(W.T, bits, 32)  # (N, K)
    assert len(np.unique(deq.reshape(24, 2, 32)[0, 0])) <= 2**bits
    assert np.allclose(got, X @ deq.T, rtol=1e-4, atol=1e-4 * np.abs(got).max())


def test_ort_gptq_refuses_widths_it_would_silently_write_as_4_bits(tmp_path):
    from moqe_compile.errors import ConfigError
    from moqe_compile.quantize.nbits import quantize_matmulnbits

    with pytest.raises(ConfigError, match="4-bit weights only; got bits = 8"):
        quantize_matmulnbits(tmp_path / "fp.onnx", tmp_path / "q.onnx", "gptq-ort", 8, 32, True, [])


def test_matmul_sensitivity_ranks_the_matmul_with_outlier_weights_first(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from moqe_compile.quantize.gptq import matmul_sensitivity

    rng = np.random.default_rng(6)
    K = 64
    smooth = rng.normal(size=(K, K)).astype(np.float32)
    spiky = smooth.copy()
    for n in range(K):  # one outlier weight in every group of 32 inputs: each group's grid coarsens ~25x
        for g0 in (0, 32):
            spiky[g0 + rng.integers(32), n] *= 25
    g = helper.make_graph([helper.make_node("MatMul", ["x", "a"], ["h"], name="smooth"),
                           helper.make_node("MatMul", ["h", "b"], ["y"], name="spiky")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", K])],
                          [numpy_helper.from_array(smooth, "a"), numpy_helper.from_array(spiky, "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    feeds = [{"x": rng.normal(size=(64, K)).astype(np.float32)}]
    sens = matmul_sensitivity(tmp_path / "m.onnx", feeds, 4, 32, True)
    assert set(sens) == {"smooth", "spiky"} and sens["spiky"] > 2 * sens["smooth"] > 0
    assert matmul_sensitivity(tmp_path / "m.onnx", feeds, 8, 32, True)["spiky"] < sens["spiky"] / 100  # 8 bits: ~256x less
    assert set(matmul_sensitivity(tmp_path / "m.onnx", feeds, 4, 32, True, {"spiky"})) == {"smooth"}
