"""Block reconstruction (``quantize/brecq.py``) on the tiny CNNs: where the blocks are, that it
lowers a block's output error below layer-wise AdaRound's, and that its experts are ordinary
Q/DQ graphs every backend accepts."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from moqe_compile.errors import ConfigError
from moqe_compile.quantize import check_qdq, prepare_for_quantization
from moqe_compile.quantize.brecq import blocks, cuts
from moqe_compile.quantize.graph import run_with_outputs, weight_layers
from moqe_compile.tasks.image.config import BuildConfig, ExpertRecipe
from moqe_compile.tasks.image.experts import build_expert, expert_cost

from ..models import class_batch, write_cnn, write_residual_cnn


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    d = tmp_path_factory.mktemp("brecq-plain")
    return prepare_for_quantization(write_cnn(d), d / "prep.onnx"), d


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    d = tmp_path_factory.mktemp("brecq-res")
    return prepare_for_quantization(write_residual_cnn(d), d / "prep.onnx"), d


def _build(prep, d, recipe, x, backends=("onnxruntime-cpu",)):
    outs = {b: d / f"{recipe.name}.{b}.onnx" for b in backends}
    info = build_expert(prep, "input", x, recipe, list(backends), outs, d / f"{recipe.name}.json", d)
    return info, outs


def test_blocks_follow_the_cuts_and_keep_the_inverted_residual_whole(residual):
    prep, _ = residual
    m = onnx.load(str(prep))
    names = [l.node for l in weight_layers(m)]
    add = next(n for n in m.graph.node if n.op_type == "Add")
    # The skip connection's input is live across the whole inverted residual: no cut inside it.
    assert add.output[0] in [t for _, t in cuts(m, "input")]
    got = blocks(m, "input", set(names), 3)
    assert [l for b in got for l in b.layers] == names  # every layer in exactly one block, in order
    inner = [n.name for n in m.graph.node if n.op_type == "Conv"][1:]  # expand, depthwise, project
    assert any(set(inner) <= set(b.layers) for b in got)
    assert got[0].t_in == "input" and got[-1].t_out == m.graph.output[0].name


def test_block_reconstruction_lowers_the_block_error_below_layerwise_adaround(plain):
    prep, d = plain
    x, _ = class_batch(64, seed=0)
    held_out, _ = class_batch(64, seed=5)
    common = dict(weight_bits=4, calibration="mse", weight_clip="mse")
    ada = ExpertRecipe(name="ada", weight_rounding="adaround", adaround_iters=300, **common)
    blk = ExpertRecipe(name="blk", weight_rounding="brecq", block_iters=300, **common)
    near = ExpertRecipe(name="near", **common)
    m = onnx.load(str(prep))
    first = blocks(m, "input", {l.node for l in weight_layers(m)}, 3)[0]
    assert len(first.layers) == 3
    fp = np.concatenate(run_with_outputs(m, [first.t_out], "input", held_out)[first.t_out])
    err = {}
    for r in (near, ada, blk):
        info, outs = _build(prep, d, r, x)
        q = onnx.load(str(outs["onnxruntime-cpu"]))
        got = np.concatenate(run_with_outputs(q, [first.t_out], "input", held_out)[first.t_out])
        err[r.name] = float(((got - fp) ** 2).mean())
    assert info["steps"]["brecq_blocks"] == 2
    assert err["blk"] < err["ada"] < err["near"], err


def test_brecq_expert_passes_check_qdq_on_every_backend(residual):
    prep, d = residual
    x, _ = class_batch(32, seed=1)
    r = ExpertRecipe.from_preset("brecq", "w4a8-brecq", block_iters=40, qdrop=0.5, block_early_stop=0.05)
    info, outs = _build(prep, d, r, x, ("onnxruntime-cpu", "tensorrt"))
    for b, path in outs.items():
        assert check_qdq(path, b)["ok"], check_qdq(path, b)["violations"]
    assert info["variants"]["onnxruntime-cpu"]["check"]["kernels"]["float"] == {}
    assert info["steps"]["peak_rss_mb"] > 0
    q = onnx.load(str(outs["onnxruntime-cpu"]))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    base = onnx.load(str(prep))
    # BatchNorm is folded before quantization, and the depthwise layer has one scale per channel.
    assert not [n for n in base.graph.node if n.op_type == "BatchNormalization"]
    dw = next(l for l in weight_layers(base) if l.attrs.get("group", 1) > 1)
    channels = onnx.numpy_helper.to_array(next(i for i in base.graph.initializer if i.name == dw.weight)).shape[0]
    assert inits[f"{dw.weight}_scale"].shape == (channels,)
    # First and last layer at 8 bits, the others on the int4 grid.
    layers = weight_layers(base)
    wide = {layers[0].weight, layers[-1].weight}
    for l in layers:
        w = inits[f"{l.weight}_quantized"]
        if l.weight in wide:
            assert np.abs(w).max() > 7
        else:
            assert w.min() >= -8 and w.max() <= 7


def test_mean_weight_bits_counts_the_8_bit_ends(plain):
    prep, _ = plain
    m = onnx.load(str(prep))
    sizes = [int(np.prod(numpy_helper.to_array(i).shape)) for l in weight_layers(m)
             for i in m.graph.initializer if i.name == l.weight]
    expect = (8 * (sizes[0] + sizes[-1]) + 4 * sum(sizes[1:-1])) / sum(sizes)
    assert expert_cost(prep, [], 4, ends=True) == pytest.approx(expect)
    assert expert_cost(prep, [], 4) == pytest.approx(4.0)


def test_w4a8_brecq_preset_resolves_and_serializes_to_the_manifest():
    cfg = BuildConfig.from_dict({"experts": [{"name": "b", "preset": "w4a8-brecq", "block_iters": 50},
                                             {"name": "m", "calibration": "minmax"}]})
    b = cfg.experts[0]
    assert (b.weight_rounding, b.weight_bits, b.high_precision_ends, b.block_iters) == ("brecq", 4, True, 50)
    blob = json.loads(json.dumps(cfg.to_manifest()))
    written = blob["_data"]["experts"]
    assert written[0]["weight_rounding"] == "brecq" and written[0]["block_iters"] == 50
    assert written[0]["high_precision_ends"] is True
    assert "block_iters" not in written[1] and "high_precision_ends" not in written[1]  # unset: not written
    assert BuildConfig.from_manifest(blob) == cfg


@pytest.mark.parametrize("bad", [{"qdrop": 1.0}, {"block_early_stop": -0.1}, {"block_iters": 0},
                                 {"bias_correction": True}, {"weight_bits": 8, "high_precision_ends": False}])
def test_bad_block_settings_are_refused(bad):
    if bad.get("weight_bits") == 8:
        with pytest.raises(ConfigError, match="high_precision_ends"):
            ExpertRecipe(name="x", weight_bits=8, high_precision_ends=True)
        return
    with pytest.raises(ConfigError):
        ExpertRecipe.from_preset("x", "w4a8-brecq", **bad)
