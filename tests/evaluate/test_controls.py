"""Build-time control helpers: expert cost, the copies file, which recipe the copies repeat."""

import numpy as np
import onnx

from moqe_compile.tasks.image.config import BuildConfig, ExpertRecipe
from moqe_compile.evaluate.controls import Copies, copy_recipe, expert_cost, strongest_expert
from moqe_compile.quantize import prepare_for_quantization
from moqe_compile.quantize.graph import weight_layers


def test_expert_cost_counts_fp_layers_as_32_bits(tiny_onnx, tmp_path):
    prep = prepare_for_quantization(tiny_onnx, tmp_path / "prep.onnx")
    m = onnx.load(str(prep))
    sizes = {i.name: int(np.prod(i.dims)) for i in m.graph.initializer}
    layers = weight_layers(m)
    n = [sizes[l.weight] for l in layers]
    assert expert_cost(prep, [], 4) == 4.0
    want = (32 * n[0] + 8 * sum(n[1:])) / sum(n)
    assert abs(expert_cost(prep, [layers[0].node], 8) - want) < 1e-9


def test_copies_roundtrip_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    c = Copies(["copy0", "copy1"], "strongest", 1, 10,
               {"router_val": {"loss": rng.random((5, 2)), "pred": rng.integers(0, 3, (5, 2)), "route": np.arange(5) % 2},
                "test": {"loss": rng.random((4, 2)), "pred": rng.integers(0, 3, (4, 2)), "route": None}})
    c.save(tmp_path / "c.npz")
    back = Copies.load(tmp_path / "c.npz")
    assert back.names == c.names and back.best == 1 and back.preset == "strongest" and back.calibration_per_copy == 10
    np.testing.assert_array_equal(back.splits["router_val"]["route"], c.splits["router_val"]["route"])
    assert back.splits["test"]["route"] is None
    d = back.for_split("test")
    assert d["names"] == ["copy0", "copy1"] and d["loss"].shape == (4, 2)


def test_copies_repeat_the_strongest_expert_else_the_preset():
    cfg = BuildConfig(experts=[ExpertRecipe(name="a"), ExpertRecipe.from_preset("s4", "w4a8-strongest")])
    assert strongest_expert(cfg.experts) == "s4" and copy_recipe(cfg).weight_bits == 4
    cfg = BuildConfig(experts=[ExpertRecipe(name="a", weight_bits=4, weight_clip="mse"), ExpertRecipe(name="b")])
    assert strongest_expert(cfg.experts) is None
    r = copy_recipe(cfg)
    assert r.preset == "w4a8-strongest" and r.weight_rounding == "gptq"
