"""The controls: cost matching, the copies vectors and file, the random router, expert cost, which recipe the copies repeat."""

import numpy as np
import onnx
import pytest

from moqe_compile.tasks.image.config import BuildConfig, ExpertRecipe
from moqe_compile.evaluate.controls import Copies, copies_entries, cost_matched, frontier_pair, interpolate, random_route
from moqe_compile.tasks.image.experts import copy_recipe, expert_cost, strongest_expert
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


def test_cost_matched_uses_the_best_mix_not_the_best_on_each_side():
    # w2-all at 2.000 bits, w2-hp-stem at 2.011 (as good as MoQE), w2-hp-stage1 at 4.27 (lowest
    # loss): at an expected 2.010 bits the matched single-expert mix is w2-all/w2-hp-stem.
    names, costs = ["all", "stem", "stage1"], [2.0, 2.011, 4.27]
    lo, hi, w = frontier_pair(names, costs, 2.010, {"all": 0.897, "stem": 0.907, "stage1": 0.909})
    assert (lo, hi) == ("all", "stem") and w == pytest.approx(1 / 11)


def test_cost_matched_prefers_validation_losses_and_says_what_it_chose_on():
    names, route = ["w8", "w4"], np.array([0, 1, 1, 1])
    cm = cost_matched(names, {"w8": 8, "w4": 4}, route, {"w8": 0.1, "w4": 0.2}, {"w8": 0.0, "w4": 1.0}, "test")
    assert cm["applicable"] and cm["chosen_on"] == "val" and cm["moqe_expected_cost"] == 5.0
    assert (cm["cheaper"], cm["costlier"]) == ("w4", "w8") and cm["weight_cheaper"] == pytest.approx(0.75)
    vec = interpolate(cm, {"w8": np.ones(4), "w4": np.zeros(4)}.get)
    assert np.allclose(vec, 0.25)
    assert cost_matched(names, {"w8": 8, "w4": 4}, route, None, {"w8": 0.0, "w4": 1.0}, "test")["chosen_on"] == "test"
    none = cost_matched(names, {"w8": 8, "w4": 4}, route)
    assert not none["applicable"] and "validation losses" in none["reason"]
    same = cost_matched(names, {"w8": 4, "w4": 4}, route, unit="weight bits", unit_name="weight bits")
    assert not same["applicable"] and same["cost"] == "weight bits" and "same weight bits" in same["reason"]
    assert cost_matched(names, {"w8": 8}, route) == {"applicable": False, "reason": "expert costs unknown"}


def test_copies_entries_and_random_route():
    loss = np.array([[0.1, 0.3], [0.5, 0.2], [0.4, 0.4]])
    got = copies_entries({"names": ["c0", "c1"], "loss": loss, "route": np.array([1, 1, 0])}, lambda c: c)
    assert set(got) == {"copy:c0", "copy:c1", "copies_oracle", "copies_router"}
    assert got["copies_oracle"].tolist() == [0, 1, 0] and got["copy:c1"].tolist() == [1, 1, 1]
    assert "copies_router" not in copies_entries({"names": ["c0", "c1"], "loss": loss}, lambda c: c)
    route = np.array([0, 0, 1, 2, 2, 2])
    shuffled = random_route(route, 0)
    assert sorted(shuffled.tolist()) == route.tolist() and np.array_equal(shuffled, random_route(route, 0))
