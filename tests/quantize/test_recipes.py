"""Weight-level passes (clipping, activation ranges, AdaRound, equalization) and check-qdq: each
must do what it claims, checked on numbers, not just on structure."""

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moqe_compile.errors import InputError
from moqe_compile.tasks.image.config import ExpertRecipe
from moqe_compile.quantize import check_qdq
from moqe_compile.quantize.adaround import adaround_layer
from moqe_compile.quantize.calibrate import mse_ranges
from moqe_compile.quantize.equalize import equalize
from moqe_compile.quantize.graph import get_init, weight_layers
from moqe_compile.quantize.weights import channel_scales, dequantize, quantize_nearest

from ..tasks.image.helpers import build, make_setup, run_ort


@pytest.fixture(scope="module")
def setup(tiny_onnx, tmp_path_factory):
    return make_setup(tiny_onnx, tmp_path_factory.mktemp("rec"), 48, seed=1)


_run, _build = run_ort, build


def test_mse_weight_clip_beats_minmax_at_4_bits():
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(16, 64)).astype(np.float32)  # heavy tails: clipping pays
    errs = {}
    for clip in ("minmax", "mse"):
        s = channel_scales(w, 7, clip)
        errs[clip] = float(((w - dequantize(quantize_nearest(w, s, 7), s)) ** 2).sum())
    assert errs["mse"] < 0.9 * errs["minmax"]


def test_mse_activation_range_clips_rare_outlier():
    rng = np.random.default_rng(0)
    # One outlier in a million: keeping it costs every sample resolution; clipping costs one.
    data = np.concatenate([rng.normal(size=1_000_000), [60.0]])
    thr = np.abs(data).max()
    hist, edges = np.histogram(data, 2048, range=(-thr, thr))
    r = mse_ranges({"t": (hist, edges, data.min(), data.max(), thr)}, asymmetric=True)["t"]
    assert 0 < r.highest < 0.5 * data.max() and r.lowest < 0

    def err(lo, hi):
        s = (hi - lo) / 255
        return float(((data - (np.clip(np.round((data - lo) / s), 0, 255) * s + lo)) ** 2).sum())

    assert err(r.lowest, r.highest) < 0.8 * err(data.min(), data.max())


def test_adaround_beats_nearest_on_layer_output():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3).numpy()
    # Correlated inputs (as real activations are): for white inputs nearest rounding is optimal.
    base = torch.nn.functional.interpolate(torch.randn(32, 1, 5, 5), size=(10, 10), mode="bilinear")
    x = (base * torch.tensor([1.0, 0.8, -0.6, 0.5]).view(1, 4, 1, 1) + 0.2 * torch.randn(32, 4, 10, 10)).numpy()
    attrs = {"pads": [1, 1, 1, 1], "strides": [1, 1]}
    s = channel_scales(w, 7, "minmax")
    q_near = quantize_nearest(w, s, 7)
    q_ada = adaround_layer("Conv", attrs, w, None, s, 7, x, iters=400)
    assert np.abs(q_ada - q_near).max() <= 1 and (q_ada != q_near).any()

    def out_err(q):
        ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1)
        got = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(dequantize(q, s)), padding=1)
        return float(((ref - got) ** 2).mean())

    assert out_err(q_ada) < 0.7 * out_err(q_near)


def test_equalization_preserves_function_and_balances_ranges(setup):
    prep, x, _ = setup
    m = onnx.load(str(prep))
    before = [get_init(m, l.weight) for l in weight_layers(m)]
    assert equalize(m) == 2  # conv0->relu->conv1 and conv1->relu->conv2
    y0 = _run(prep, x)
    y1 = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(y0, y1, rtol=1e-4, atol=1e-5)
    after = [get_init(m, l.weight) for l in weight_layers(m)]

    def spread(w):
        return np.ptp(np.log(np.abs(w.reshape(w.shape[0], -1)).max(1)))

    assert spread(after[1]) <= spread(before[1]) + 1e-6


def test_check_qdq_rejects_u8s8_for_tensorrt_naming_nodes(setup):
    _, outs = _build(setup, ExpertRecipe(name="cpuonly"), ("onnxruntime-cpu",))
    res = check_qdq(outs["onnxruntime-cpu"], "tensorrt")
    assert not res["ok"]
    assert any("zero-point dtype uint8" in v and "node '" in v for v in res["violations"])


def test_check_qdq_rejects_fp_model_for_ort_cpu(setup):
    prep, _, _ = setup
    res = check_qdq(prep, "onnxruntime-cpu")
    assert not res["ok"] and any("runs in float" in v for v in res["violations"])


def _escaping_external_data() -> bytes:
    w = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [1.0])
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../../../etc/passwd")
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [], [y], [w])
    return onnx.helper.make_model(graph).SerializeToString()


@pytest.mark.parametrize("content", ["garbage", "escaping external data"])
@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime-cpu"])
def test_check_qdq_names_a_file_that_is_not_onnx_for_every_target(tmp_path, target, content):
    bad = tmp_path / "photo.jpg"
    # Both were tracebacks (protobuf DecodeError, onnx ValidationError) for tensorrt.
    bad.write_bytes(b"garbage" if content == "garbage" else _escaping_external_data())
    with pytest.raises(InputError, match=f"model {re.escape(repr(str(bad)))} is not a readable ONNX model"):
        check_qdq(bad, target)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime-cpu"])
def test_check_qdq_names_a_protobuf_that_holds_no_graph(tmp_path, target):
    bad = tmp_path / "two-bytes.onnx"
    bad.write_bytes(b"\x08\x07")  # parses as a ModelProto (ir_version 7) with no graph
    with pytest.raises(InputError, match="holds no ONNX graph"):
        check_qdq(bad, target)
