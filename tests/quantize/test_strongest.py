"""The strongest single expert's passes: GPTQ rounding of Conv/Gemm weights, activation ranges
refitted on the quantized stream, the output-MSE clip search, and its presets' validation."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from moqe_compile.tasks.image.config import EXPERT_PRESETS, STRONGEST_PRESETS, ExpertRecipe, default_experts
from moqe_compile.errors import ConfigError
from moqe_compile.quantize.gptq import LayerHessian, gptq_round
from moqe_compile.quantize.sequential import fit_activation_mse
from moqe_compile.quantize.weights import channel_scales, dequantize, quantize_nearest


def _correlated(n, c, hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.randn(n, 1, 5, 5, generator=g), size=(hw, hw), mode="bilinear")
    mix = torch.linspace(1.0, -0.5, c).view(1, c, 1, 1)
    return (base * mix + 0.2 * torch.randn(n, c, hw, hw, generator=g)).numpy()


def test_gptq_conv_beats_nearest_on_layer_output_and_stays_on_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3).numpy()
    x = _correlated(32, 4, 10)
    attrs = {"pads": [1, 1, 1, 1], "strides": [1, 1]}
    s = channel_scales(w, 7, "mse")
    h = LayerHessian("Conv", attrs, w.shape)
    h.add(x[:16])
    h.add(x[16:])
    q_g = gptq_round(w, s, 7, h)
    q_n = quantize_nearest(w, s, 7)
    assert q_g.dtype == np.int32 and q_g.shape == w.shape
    assert q_g.min() >= -8 and q_g.max() <= 7 and (q_g != q_n).any()

    def out_err(q):
        ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1)
        got = F.conv2d(torch.from_numpy(x), torch.from_numpy(dequantize(q, s)), padding=1)
        return float(((ref - got) ** 2).mean())

    assert out_err(q_g) < 0.7 * out_err(q_n)


def test_gptq_with_white_inputs_is_nearest_rounding():
    # H = c I: no column's error can be compensated by another, so GPTQ must equal nearest.
    w = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    h = LayerHessian("Gemm", {}, w.shape)
    h.add(np.eye(5, dtype=np.float32))
    s = channel_scales(w, 7, "minmax")
    np.testing.assert_array_equal(gptq_round(w, s, 7, h, damp=0.01), quantize_nearest(w, s, 7))


def test_gptq_grouped_conv_uses_each_groups_own_inputs():
    # Depthwise: channel c only sees input channel c. Making channel 1's input zero makes its
    # Hessian dead; the other channels must still be compensated from their own inputs.
    w = np.random.default_rng(1).normal(size=(3, 1, 3, 3)).astype(np.float32)
    x = _correlated(16, 3, 8, seed=2)
    x[:, 1] = 0
    attrs = {"pads": [1, 1, 1, 1], "group": 3}
    h = LayerHessian("Conv", attrs, w.shape)
    h.add(x)
    assert h.H.shape == (3, 9, 9) and float(h.H[1].abs().max()) == 0.0
    s = channel_scales(w, 7, "minmax")
    q = gptq_round(w, s, 7, h)
    np.testing.assert_array_equal(q[1], quantize_nearest(w, s, 7)[1])
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1, groups=3)

    def err(qq):
        got = F.conv2d(torch.from_numpy(x), torch.from_numpy(dequantize(qq, s)), padding=1, groups=3)
        return float(((ref - got) ** 2).mean())

    assert err(q) <= err(quantize_nearest(w, s, 7))


def test_activation_fit_clips_outlier_and_follows_ort_conventions():
    rng = np.random.default_rng(0)
    # One outlier in a million: keeping it costs every sample resolution; clipping costs one.
    v = np.concatenate([np.abs(rng.normal(size=1_000_000)), [30.0]]).astype(np.float32)
    scale, zp = fit_activation_mse(v, onnx.TensorProto.UINT8, symmetric=False)
    assert int(zp) == 0 and np.asarray(zp).dtype == np.uint8  # non-negative data: zero-point 0
    assert 0 < scale * 255 < 0.5 * 30
    s_sym, zp_sym = fit_activation_mse(v - 1.0, onnx.TensorProto.INT8, symmetric=True)
    assert int(zp_sym) == 0 and np.asarray(zp_sym).dtype == np.int8 and s_sym > 0


def test_strongest_presets_are_named_and_in_the_default_set():
    assert set(STRONGEST_PRESETS) <= set(EXPERT_PRESETS)
    assert EXPERT_PRESETS["w4a8-strongest"]["weight_bits"] == 4
    assert any(e.preset == "strongest" for e in default_experts())
    with pytest.raises(ConfigError, match="needs per_channel"):
        ExpertRecipe(name="x", weight_rounding="gptq", per_channel=False)
    with pytest.raises(ConfigError, match="needs calibration = 'mse'"):
        ExpertRecipe(name="x", sequential_activations=True, calibration="minmax")



def test_output_mse_clip_search_is_never_worse_than_any_candidate_per_channel():
    from moqe_compile.quantize.gptq import gptq_clip_search, row_errors
    from moqe_compile.quantize.sequential import clip_candidates

    rng = np.random.default_rng(4)
    w = rng.standard_t(3, size=(8, 4, 3, 3)).astype(np.float32)  # heavy tails: clipping matters
    x = _correlated(24, 4, 8, seed=4)
    h = LayerHessian("Conv", {"pads": [1, 1, 1, 1]}, w.shape)
    h.add(x)
    cands = clip_candidates(w, 7)
    q, s = gptq_clip_search(w, 7, h, cands)
    got = row_errors(w, q, s, h)
    for c in cands:
        assert (got <= row_errors(w, gptq_round(w, c, 7, h), c, h) + 1e-12).all()
    assert all(any(np.isclose(s[i], c[i]) for c in cands) for i in range(len(s)))
    with pytest.raises(ConfigError, match="needs weight_rounding = 'gptq'"):
        ExpertRecipe(name="x", weight_clip="mse-output")
