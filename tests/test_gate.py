"""The significance gate: its rule on plain numbers (boundaries included), each task's
adapter, and both branches end to end through the image ``build``.

The experts' outputs are constructed (the build's ``score`` step is replaced) so that the
answer is known: in one case each expert is exact on one router-visible input region (red or
blue images) and wrong elsewhere, so routing must win and be kept; in the other the experts
are perturbed copies of FP with independent noise, so routing must be refused. The router,
its fallback, the report, the copies control and the gate are the real ones.
"""

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from moqe_compile import Runtime
from moqe_compile.build import build
from moqe_compile.tasks.image import steps
from moqe_compile.cli.inspect import render
from moqe_compile.tasks.image.config import ControlsConfig, ExpertRecipe, GateConfig, RouterConfig
from moqe_compile.evaluate.losses import sample_losses
from moqe_compile.gate import Comparison, decide, significant
from moqe_compile.tasks.image.report import gate_decision
from moqe_compile.tasks.image.score import Scores

from .models import CROP, NUM_CLASSES, class_batch, tiny_config


@pytest.fixture(scope="module")
def region_images(tmp_path_factory):
    """160 labelled images; half red, half blue (the region), independent of the class."""
    root = tmp_path_factory.mktemp("regions")
    rng = np.random.default_rng(0)
    for i in range(160):
        c, region = i % NUM_CLASSES, (i // NUM_CLASSES) % 2
        d = root / str(c)
        d.mkdir(exist_ok=True)
        img = np.zeros((40, 40, 3), np.float32)
        img[..., 0 if region == 0 else 2] = 200
        img = np.clip(img + rng.normal(0, 30, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img_{i:03d}.png")
    return root


def _region(x):
    return (x[:, 2].mean(axis=(1, 2)) > x[:, 0].mean(axis=(1, 2))).astype(int)  # 0 red, 1 blue


def _fake_score(kind):
    def score(fp_session, expert_sessions, x, labels, targets, progress=None):
        K, n = len(expert_sessions), len(x)
        fp = 5.0 * np.eye(NUM_CLASSES, dtype=np.float32)[labels]
        wrong = 5.0 * np.eye(NUM_CLASSES, dtype=np.float32)[(labels + 1) % NUM_CLASSES]
        rng = np.random.default_rng(int(x[:, :, 0, 0].sum() * 1000) % 2**32)
        if kind == "regions":
            reg = _region(x)
            ex = np.stack([np.where((reg == k)[:, None], fp, wrong) for k in range(K)])
        else:
            ex = np.stack([fp + rng.normal(0, 3.0, fp.shape).astype(np.float32) for _ in range(K)])
        if progress:
            progress.update(1 + K)
        loss = np.stack([sample_losses(e, fp, labels, targets) for e in ex], axis=1)
        return Scores(fp, ex, loss)

    return score


def _build(tmp_path_factory, tiny_onnx, images, kind, force=False):
    cfg = tiny_config(tiny_onnx, images, targets="labels")
    cfg.data.augmentations = 0
    cfg.experts = [ExpertRecipe(name="a", calibration="minmax"), ExpertRecipe(name="b", calibration="minmax",
                                                                              per_channel=False)]
    cfg.router = RouterConfig(preset="small", input_size=8, epochs=8, batch_size=8)
    cfg.controls = ControlsConfig(copies=2)
    cfg.gate.force_routing = force
    mp = pytest.MonkeyPatch()
    mp.setattr(steps, "score", _fake_score(kind))
    try:
        return build(cfg, tmp_path_factory.mktemp("gate") / kind, quiet=True)
    finally:
        mp.undo()


def test_experts_exact_on_visible_regions_are_routed(tmp_path_factory, tiny_onnx, region_images):
    out = _build(tmp_path_factory, tiny_onnx, region_images, "regions")
    m = json.loads((out / "manifest.json").read_text())
    g = m["router"]["gate"]
    assert g["decision"] == "routed" and not g["forced"], g
    assert g["p_value"] < 0.05 and g["val_gain"] > 0.2
    assert g["copies_control"] == "copies router" and g["val_gain"] > g["copies_val_gain"]
    assert m["routing"]["enabled"] is True
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["gate"] == g and rep["splits"]["test"]["controls"]["copies_oracle"]["copies"] == 2
    assert "gate        routed" in render(str(out))


def test_perturbed_copies_are_refused_and_served_alone(tmp_path_factory, tiny_onnx, region_images):
    out = _build(tmp_path_factory, tiny_onnx, region_images, "copies")
    m = json.loads((out / "manifest.json").read_text())
    g = m["router"]["gate"]
    assert g["decision"] == "single" and m["routing"]["enabled"] is False, g
    assert g["reason"]
    x = np.random.default_rng(0).normal(size=(6, 3, CROP, CROP)).astype(np.float32)
    with Runtime.load(out) as rt:
        assert not rt.routed
        idx, _ = rt.route(x)
        assert (idx == rt.expert_names.index(m["routing"]["default_expert"])).all()
    assert "gate        single" in render(str(out))


def test_force_routing_overrides_and_says_so(tmp_path_factory, tiny_onnx, region_images):
    out = _build(tmp_path_factory, tiny_onnx, region_images, "copies", force=True)
    m = json.loads((out / "manifest.json").read_text())
    g = m["router"]["gate"]
    assert g["decision"] == "routed" and g["forced"] and m["routing"]["enabled"] is True
    assert "forced by --force-routing" in g["reason"] and "FORCED" in render(str(out))


def _val_report(gain_p_copies):
    gain, p, copies_gain = gain_p_copies
    co = {"best_copy": "c0", "copies_metrics": {"c0": {"top1": {"value": 0.9}}},
          "router": {"top1": {"value": 0.9 + copies_gain}}, "oracle_gain": {"diff": 0.05}}
    return {"moqe_vs_best": {"diff": gain, "p_value": p, "metric": "top1"}, "best_expert": {"name": "e"},
            "controls": {"copies_oracle": co}}


@pytest.mark.parametrize("gain,p,copies,decision", [
    (0.02, 0.01, 0.005, "routed"),
    (0.02, 0.20, 0.005, "single"),   # not significant
    (0.02, 0.01, 0.030, "single"),   # no more than routing among copies gains
    (-0.01, 0.01, -0.02, "single"),  # significantly worse
])
def test_gate_rule(gain, p, copies, decision):
    g = gate_decision(_val_report((gain, p, copies)), 0.05, force=False)
    assert g["decision"] == decision and g["copies_val_gain"] == pytest.approx(copies)


def test_cost_aware_router_and_cost_matched_control(tmp_path_factory, tiny_onnx, region_images):
    """Experts exact on different regions but of different cost: a large cost_weight must route
    (almost) everything to the cheap expert, and the report compares MoQE at its expected cost."""
    cfg = tiny_config(tiny_onnx, region_images, targets="labels")
    cfg.data.augmentations = 0
    cfg.experts = [ExpertRecipe(name="w8", calibration="minmax"),
                   ExpertRecipe(name="w4", calibration="minmax", weight_bits=4)]
    cfg.router = RouterConfig(preset="small", input_size=8, epochs=8, batch_size=8, cost_weight=10.0)
    cfg.controls = ControlsConfig(copies=0)
    mp = pytest.MonkeyPatch()
    mp.setattr(steps, "score", _fake_score("regions"))
    try:
        out = build(cfg, tmp_path_factory.mktemp("gate") / "cost", quiet=True)
    finally:
        mp.undo()
    m = json.loads((out / "manifest.json").read_text())
    assert [e["cost"]["mean_weight_bits"] for e in m["experts"]] == [8.0, 4.0]
    rep = json.loads((out / "report" / "report.json").read_text())["splits"]["test"]
    assert rep["usage"]["w4"] >= 0.9
    cm = rep["controls"]["cost_matched"]
    assert cm["applicable"] and cm["moqe_expected_cost"] < 4.5
    assert m["router"]["gate"]["copies_val_gain"] is None  # no copies: the gate says it tested without them


def test_gate_also_needs_the_best_single_expert_on_the_metric():
    """The default expert is the lowest-loss one; a router that mostly serves a different expert,
    better on top-1, must beat *that* expert too (found on the W2A8 cost-aware case)."""
    rep = _val_report((0.02, 0.01, 0.0))
    rep["experts"] = {"e": {"top1": {"value": 0.90}}, "stem": {"top1": {"value": 0.92}}}
    rep["moqe_vs_each"] = {"e": {"diff": 0.02, "p_value": 0.01}, "stem": {"diff": 0.0, "p_value": 1.0}}
    g = gate_decision(rep, 0.05, force=False)
    assert g["decision"] == "single" and "stem" in g["reason"]
    rep["moqe_vs_each"]["stem"] = {"diff": 0.01, "p_value": 0.01}
    assert gate_decision(rep, 0.05, force=False)["decision"] == "routed"


def test_p_equal_to_alpha_is_refused():
    """Strictly below alpha: a p-value on the threshold does not pass (``<``, never ``<=``)."""
    assert not significant(0.05, 0.05) and significant(0.0499, 0.05) and not significant(None, 0.05)
    at = decide(Comparison("e", 0.02, 0.05), 0.05, force=False, metric="top1")
    assert at["decision"] == "single" and "p = 0.05 >= 0.05" in at["reason"]
    below = decide(Comparison("e", 0.02, 0.04999), 0.05, force=False, metric="top1")
    assert below["decision"] == "routed" and "no copies control was built" in below["reason"]


def test_gain_must_strictly_exceed_zero_and_the_copies_bar():
    assert decide(Comparison("e", 0.0, 0.01), 0.05, False, "top1")["decision"] == "single"
    tie = decide(Comparison("e", 0.02, 0.01), 0.05, False, "top1", copies_gain=0.02, copies_control="copies router")
    assert tie["decision"] == "single" and "copies router" in tie["reason"]
    above = decide(Comparison("e", 0.02, 0.01), 0.05, False, "top1", copies_gain=0.0199, copies_control="copies router")
    assert above["decision"] == "routed" and above["copies_val_gain"] == 0.0199


def test_headline_expert_needs_a_significant_win_too():
    head_at_alpha = Comparison("stem", 0.01, 0.05)
    g = decide(Comparison("e", 0.02, 0.01), 0.05, False, "top1", headline=head_at_alpha)
    assert g["decision"] == "single" and "stem" in g["reason"]
    no_test = decide(Comparison("e", 0.02, 0.01), 0.05, False, "top1", headline=Comparison("stem", 0.01, None))
    assert no_test["decision"] == "single" and "p = n/a" in no_test["reason"]
    same = decide(Comparison("e", 0.02, 0.01), 0.05, False, "top1", headline=Comparison("e", 0.02, 0.01))
    assert same["decision"] == "routed"


def test_gate_keys_and_forcing():
    g = decide(Comparison("e", -0.01, 0.5), 0.05, True, "mean_nll")
    assert set(g) == {"decision", "p_value", "val_gain", "metric", "threshold", "copies_val_gain", "copies_control",
                      "reason", "forced", "split"}
    assert g["decision"] == "routed" and g["forced"] and g["reason"].startswith("forced by --force-routing")
    assert "nats/token" in g["reason"] and g["split"] == "router_val"


def test_gains_are_written_in_the_metrics_unit():
    from moqe_compile.gate import format_gain

    assert format_gain("top1", 0.0123) == "+1.23 points" and format_gain("fp_top1_agreement", -0.5) == "-50.00 points"
    assert format_gain("mean_nll", 0.01234) == "+0.0123 nats/token" and format_gain("kl", 0.000123456) == "+0.0001235"


def test_every_reason_is_in_the_metrics_unit_and_all_are_joined():
    g = decide(Comparison("e", 0.0, 0.5), 0.05, False, "top1", copies_gain=0.01, copies_control="copies router",
               headline=Comparison("stem", -0.02, 0.03))
    assert g["reason"] == ("paired test vs e: p = 0.5 >= 0.05; no gain over e (+0.00 points); gain +0.00 points does "
                           "not exceed the copies router's +1.00 points; does not significantly beat stem, the best "
                           "single expert on top1 (-2.00 points, p = 0.03)")
    assert g["forced"] is False and g["decision"] == "single"


def test_routed_reasons_name_the_gain_and_the_test():
    g = decide(Comparison("e", 0.02, 0.001), 0.05, False, "top1", copies_gain=0.01, copies_control="copies oracle",
               split="val")
    assert g["reason"] == ("MoQE beats e on val by +2.00 points (p = 0.001 < 0.05), more than the copies oracle's "
                           "+1.00 points")
    assert g["forced"] is False and g["decision"] == "routed" and g["copies_control"] == "copies oracle"
    g = decide(Comparison("e", 0.02, 0.001), 0.05, False, "top1")
    assert g["reason"] == ("MoQE beats e on router_val by +2.00 points (p = 0.001 < 0.05); no copies control "
                           "was built")


def test_a_headline_expert_with_no_gain_is_not_beaten_even_when_significant():
    g = decide(Comparison("e", 0.02, 0.01), 0.05, False, "top1", headline=Comparison("stem", 0.0, 0.001))
    assert g["decision"] == "single" and "does not significantly beat stem" in g["reason"]


def test_the_gate_refuses_routing_on_the_tiny_recipe_built_unforced(tiny_onnx, tiny_images, tmp_path_factory):
    """The tiny recipe built as a user would (real scores, no forcing): its 16 images cannot show
    a gain, so the gate must refuse, serve the expert with the lowest router_val loss, and the
    runtime must run that expert alone (checked against a plain session on its file)."""
    cfg = dataclasses.replace(tiny_config(tiny_onnx, tiny_images), gate=GateConfig(force_routing=False))
    root = build(cfg, tmp_path_factory.mktemp("unforced") / "b", quiet=True)
    m = json.loads((root / "manifest.json").read_text())
    g = m["router"]["gate"]
    assert g["decision"] == "single" and g["forced"] is False and g["p_value"] >= g["threshold"]
    val = json.loads((root / "report" / "report.json").read_text())["splits"]["router_val"]
    lowest = min(val["experts"], key=lambda n: val["experts"][n]["mean_loss"]["value"])
    assert m["routing"]["enabled"] is False and m["routing"]["default_expert"] == lowest
    assert lowest in g["reason"]
    names = [e["name"] for e in m["experts"]]
    path = root / m["experts"][names.index(lowest)]["variants"]["onnxruntime-cpu"]["path"]
    x, _ = class_batch(24)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with Runtime.load(root) as rt:
        got = rt.run(x)
    assert (np.asarray(got.expert_index) == names.index(lowest)).all()
    # Same file, same provider: only thread scheduling could differ, and it does not change
    # integer kernels' results; 1e-6 leaves room for the float dequantized output.
    np.testing.assert_allclose(got.logits, want, rtol=0, atol=1e-6)
