import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moqe_compile.tasks.image.config import RouterConfig
from moqe_compile.tasks.image.router import CVRouter, CVRouterCore, TemperatureAttention
from moqe_compile.tasks.image.router_export import export_router


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny routers: one torch thread


@pytest.mark.parametrize("heads,head_dim", [(8, 8), (2, 16), (1, 32)])
def test_attention_equals_the_original_formulation(heads, head_dim):
    # The graph-friendly rewrite must compute exactly what the first release's attention did
    # (so the default router's numbers do not move).
    torch.manual_seed(0)
    a = TemperatureAttention(heads * head_dim, heads, head_dim).eval()
    x = torch.randn(3, 16, heads * head_dim)
    with torch.no_grad():
        B, T, _ = x.shape
        q, k, v = a.qkv(a.norm(x)).reshape(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-2, -1)) * a.log_tau.exp(), dim=-1)
        ref = x + a.proj((att @ v).transpose(1, 2).reshape(B, T, heads * head_dim))
        torch.testing.assert_close(a(x), ref, rtol=1e-5, atol=1e-6)
    assert math.isclose(a.log_tau.exp().item(), 1 / math.sqrt(head_dim), rel_tol=1e-6)


def test_se_blocks_follow_the_config():
    keys = set(CVRouterCore(RouterConfig(preset="paper"), 3).state_dict())
    assert {f"stages.{i}.se.fc1.weight" for i in range(3)} <= keys  # paper: every block
    assert not any(".se." in k for k in CVRouterCore(RouterConfig(preset="small"), 3).state_dict())
    last = set(CVRouterCore(RouterConfig(preset="small", se=[False, False, True]), 3).state_dict())
    assert {k for k in last if ".se." in k} == {"stages.2.se.fc1.weight", "stages.2.se.fc1.bias",
                                                "stages.2.se.fc2.weight", "stages.2.se.fc2.bias"}


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("preset,pool_op", [("paper", "AveragePool"), ("default", "Slice")])
def test_export_matches_torch_with_symbolic_batch(tmp_path, preset, pool_op):
    cfg = RouterConfig(preset=preset)
    torch.manual_seed(0)
    core = CVRouterCore(cfg, 3).eval()
    p = tmp_path / "r.onnx"
    info = export_router(core, cfg.input_size, 64, p, tmp_path / "r.safetensors", mode=cfg.downsample)
    assert info == {"quantize": "none"}
    g = onnx.load(str(p))
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert pool_op in _ops(p) and (preset == "paper" or "AveragePool" not in _ops(p))
    x = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    got = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = CVRouter(core, cfg.input_size, cfg.downsample)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_subsample_takes_the_centre_pixel_of_each_cell():
    from moqe_compile.tasks.image.router import downsample

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    torch.testing.assert_close(downsample(x, 2, "subsample"), x[:, :, 2::4, 2::4])
    torch.testing.assert_close(downsample(x, 2, "avgpool"), torch.nn.functional.avg_pool2d(x, 4))
    assert downsample(torch.zeros(1, 3, 10, 10), 4, "subsample").shape == (1, 3, 4, 4)


def test_int8_router_is_quantized_and_agrees(tmp_path):
    cfg = RouterConfig(preset="small", quantize="int8")
    torch.manual_seed(0)
    core = CVRouterCore(cfg, 3).eval()
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(64, 3, 64, 64)).astype(np.float32)
    p = tmp_path / "r.onnx"
    info = export_router(core, cfg.input_size, 64, p, tmp_path / "r.safetensors", mode=cfg.downsample,
                         quantize="int8", calib_x=calib)
    assert info["quantize"] == "int8" and info["int8_argmax_agreement"] >= 0.9
    ops = _ops(p)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert onnx.load(str(p)).graph.input[0].type.tensor_type.shape.dim[0].dim_param
    with pytest.raises(Exception, match="needs calibration images"):
        export_router(core, cfg.input_size, 64, tmp_path / "q.onnx", tmp_path / "q.safetensors",
                      mode=cfg.downsample, quantize="int8")
