import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moqe_compile.errors import ConfigError
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


@pytest.mark.parametrize("preset,pool_op", [("paper", "AveragePool"), ("small", "Slice"), ("default", "Slice")])
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


def test_tiny_router_has_no_attention_block(tmp_path):
    cfg = RouterConfig(preset="tiny")
    assert cfg.arch == "se-resnet8" and not cfg.attention
    core = CVRouterCore(cfg, 3).eval()
    assert core.attn is None and not any(k.startswith("attn.") for k in core.state_dict())
    p = tmp_path / "r.onnx"
    export_router(core, cfg.input_size, 64, p, tmp_path / "r.safetensors", mode=cfg.downsample)
    ops = _ops(p)
    assert ops.count("Softmax") == 1 and not {"MatMul", "LayerNormalization"} & set(ops)
    # an attention preset keeps its block, and the attention checks still apply to it
    assert RouterConfig(preset="small").attention and CVRouterCore(RouterConfig(preset="small"), 3).attn is not None
    # the attention arch on the tiny shape (what recipes wrote with preset "default" before
    # presets version 4): one head over the last stage's width, i.e. the small router
    attn = RouterConfig(preset="tiny", arch="se-resnet8-attn")
    assert dataclasses.replace(attn, preset="small") == RouterConfig(preset="small")
    assert (RouterConfig(arch="se-resnet8-attn", heads=2).head_dim, RouterConfig(arch="se-resnet8-attn", head_dim=8).heads) == (16, 4)
    with pytest.raises(ConfigError, match="heads = 3, head_dim = 0"):
        RouterConfig(arch="se-resnet8-attn", heads=3)
    # an attention preset's shape without its attention: the preset's heads do not apply
    no_attn = RouterConfig(preset="small", arch="se-resnet8")
    assert (no_attn.heads, no_attn.head_dim, no_attn.channels) == (0, 0, [8, 16, 32])
    assert dataclasses.replace(no_attn, preset="tiny") == RouterConfig(preset="tiny")
    with pytest.raises(ConfigError, match="head_dim = 16 applies to the attention router"):
        RouterConfig(preset="small", arch="se-resnet8", head_dim=16)


def test_subsample_takes_the_centre_pixel_of_each_cell():
    from moqe_compile.tasks.image.router import downsample

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    torch.testing.assert_close(downsample(x, 2, "subsample"), x[:, :, 2::4, 2::4])
    torch.testing.assert_close(downsample(x, 2, "avgpool"), torch.nn.functional.avg_pool2d(x, 4))
    assert downsample(torch.zeros(1, 3, 10, 10), 4, "subsample").shape == (1, 3, 4, 4)
    # not a multiple: the same rule, pixel floor((i + 1/2) * H / size)
    y = torch.arange(28 * 28, dtype=torch.float32).reshape(1, 1, 28, 28)
    want = [int((i + 0.5) * 28 / 16) for i in range(16)]
    torch.testing.assert_close(downsample(y, 16, "subsample"), y[:, :, want][:, :, :, want])


@pytest.mark.parametrize("image,size", [(28, 16), (30, 8), (64, 24)])
def test_subsample_export_matches_torch_when_the_size_does_not_divide(tmp_path, image, size):
    # F.interpolate("nearest") exported to a Resize that picked other pixels (0.19 off at 28 -> 16)
    cfg = RouterConfig(preset="tiny", input_size=size)
    torch.manual_seed(0)
    core = CVRouterCore(cfg, 3, in_channels=1).eval()
    p = tmp_path / "r.onnx"
    export_router(core, size, image, p, tmp_path / "r.safetensors", channels=1, mode="subsample")
    x = np.random.default_rng(0).normal(size=(4, 1, image, image)).astype(np.float32)
    got = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = CVRouter(core, size, "subsample")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


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
