"""The split report on constructed logits where the answers are known."""

import json

import numpy as np
import pytest

from moqe_compile.evaluate.losses import sample_losses
from moqe_compile.evaluate.report import flat_metrics
from moqe_compile.tasks.image.report import build_split_report, to_markdown, write_plots

NAMES = ["a", "b", "c"]


def _case(labels=True, n=120, seed=0):
    rng = np.random.default_rng(seed)
    C = 6
    y = rng.integers(0, C, n)
    fp = rng.normal(size=(n, C)) + 4.0 * np.eye(C)[y]  # a decent FP model
    ex = np.stack([fp + s * rng.normal(size=(n, C)) for s in (1.5, 1.0, 2.0)]).astype(np.float32)
    fp = fp.astype(np.float32)
    lab = y if labels else None
    loss = np.stack([sample_losses(e, fp, lab, "labels" if labels else "fp") for e in ex], axis=1)
    best = int(loss.mean(0).argmin())  # here: chosen on this data; the function only needs an index/name
    return dict(fp_logits=fp, expert_logits=ex, expert_names=NAMES, labels=lab, loss=loss,
                targets="labels" if labels else "fp"), best


def test_keys_and_known_values():
    kw, best = _case()
    route = np.random.default_rng(1).integers(0, 3, len(kw["fp_logits"]))
    r = build_split_report(**kw, route=route, best_expert=NAMES[best], n_boot=2000)
    json.dumps(r)  # JSON-ready
    for k in ("fp", "experts", "best_expert", "oracle", "moqe", "moqe_vs_best", "moqe_vs_best_loss",
              "router_accuracy_vs_oracle", "usage", "oracle_usage", "n"):
        assert k in r, k
    assert r["n"] == 120 and r["metric"] == "top1" and r["best_expert"]["name"] == NAMES[best]
    y, ex = kw["labels"], kw["expert_logits"]
    for k, name in enumerate(NAMES):
        m = r["experts"][name]
        assert m["top1"]["value"] == pytest.approx((ex[k].argmax(1) == y).mean())
        assert m["mean_loss"]["value"] == pytest.approx(kw["loss"][:, k].mean())
        lo, hi = m["top1"]["ci95"]
        assert lo <= m["top1"]["value"] <= hi and hi - lo > 0
    idx = np.arange(len(route))
    assert r["moqe"]["top1"]["value"] == pytest.approx((ex[route, idx].argmax(1) == y).mean())
    oracle = kw["loss"].argmin(1)
    assert r["router_accuracy_vs_oracle"]["value"] == pytest.approx((route == oracle).mean())
    assert r["usage"] == {n: pytest.approx((route == k).mean()) for k, n in enumerate(NAMES)}
    assert sum(r["oracle_usage"].values()) == pytest.approx(1.0)
    assert r["fp"]["fp_top1_agreement"]["value"] == 1.0 and r["fp"]["kl_to_fp"]["value"] == pytest.approx(0, abs=1e-9)
    assert r["moqe_vs_best"]["test"] == "mcnemar" and r["moqe_vs_best_loss"]["test"] == "paired-bootstrap"
    # The oracle minimizes the loss per sample: no single expert or router can beat it.
    assert r["oracle"]["mean_loss"]["value"] <= min(r["experts"][n]["mean_loss"]["value"] for n in NAMES)
    assert flat_metrics(r["experts"]["a"], r["n"])["top1"] == r["experts"]["a"]["top1"]["value"]


def test_router_equal_to_oracle_captures_all_headroom():
    kw, best = _case()
    r = build_split_report(**kw, route=kw["loss"].argmin(1), best_expert=best, n_boot=1000)
    assert r["moqe_vs_best_loss"]["headroom_captured"] == 1.0
    assert r["moqe_vs_best"]["headroom_captured"] == 1.0
    assert r["router_accuracy_vs_oracle"]["value"] == 1.0
    assert r["moqe"] == r["oracle"]


def test_routing_everything_to_best_is_no_difference():
    kw, best = _case()
    r = build_split_report(**kw, route=np.full(len(kw["fp_logits"]), best), best_expert=NAMES[best], n_boot=1000)
    for key in ("moqe_vs_best", "moqe_vs_best_loss"):
        v = r[key]
        assert v["diff"] == 0.0 and v["ci95"] == [0.0, 0.0] and v["p_value"] == 1.0, key
        assert v["headroom_captured"] == 0.0
    assert r["moqe_vs_best"]["discordant"] == {"moqe_only": 0, "best_only": 0}
    assert r["usage"][NAMES[best]] == 1.0


def test_headroom_is_null_when_oracle_equals_best():
    kw, _ = _case()
    kw["expert_logits"] = np.stack([kw["expert_logits"][0]] * 3)  # three identical experts
    kw["loss"] = np.repeat(kw["loss"][:, :1], 3, axis=1)
    r = build_split_report(**kw, route=np.zeros(len(kw["fp_logits"]), int), best_expert=0, n_boot=500)
    assert r["moqe_vs_best"]["headroom_captured"] is None and r["moqe_vs_best_loss"]["headroom_captured"] is None


def test_without_labels_fp_agreement_is_the_metric():
    kw, best = _case(labels=False)
    r = build_split_report(**kw, route=kw["loss"].argmin(1), best_expert=best, n_boot=500)
    assert r["metric"] == "fp_top1_agreement" and not r["labels"]
    assert "top1" not in r["fp"] and "top1" not in r["moqe"]
    assert r["moqe_vs_best"]["metric"] == "fp_top1_agreement" and r["moqe_vs_best"]["test"] == "mcnemar"
    # targets = fp: the loss is the KL to FP.
    assert r["experts"]["a"]["mean_loss"]["value"] == pytest.approx(r["experts"]["a"]["kl_to_fp"]["value"])


def test_bad_shapes_and_missing_labels():
    kw, best = _case()
    with pytest.raises(ValueError, match="shapes disagree"):
        build_split_report(**kw, route=np.zeros(3, int), best_expert=best)
    kw["labels"] = None
    with pytest.raises(ValueError, match="needs labels"):
        build_split_report(**kw, route=np.zeros(120, int), best_expert=best)


def test_markdown_and_plots(tmp_path):
    kw, best = _case()
    r = build_split_report(**kw, route=kw["loss"].argmin(1), best_expert=best, n_boot=500)
    lat = {"repeats": 3, "cpu": "x86_64", "batches": {"1": {"router": {"median_ms": 0.5, "iqr_ms": [0.4, 0.6]},
                                                           "moqe": {"median_ms": 3.0, "iqr_ms": [2.9, 3.1]},
                                                           "ratios": {}, "experts_used": ["a"]}}}
    md = to_markdown(r, "title", lat)
    assert "## title" in md and "| oracle (per-sample argmin L) |" in md and "exact McNemar" in md
    assert f"expert {NAMES[best]} (best on val)" in md and "| 1 | 0.50 | 3.00 |" in md
    assert md.count("\n| ") >= 3 + 3 + 4  # model rows, usage rows, latency rows
    paths = write_plots(r, tmp_path)
    assert [p.name for p in paths] == ["metric.png", "usage.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_clustered_samples_use_the_cluster_bootstrap():
    kw, best = _case()
    groups = np.repeat(np.arange(30), 4)  # 4 views of each of 30 sources
    route = np.random.default_rng(2).integers(0, 3, 120)
    r = build_split_report(**kw, route=route, best_expert=best, groups=groups, n_boot=1000)
    plain = build_split_report(**kw, route=route, best_expert=best, n_boot=1000)
    assert r["bootstrap"]["unit"] == "source" and r["bootstrap"]["clusters"] == 30
    assert plain["bootstrap"]["unit"] == "sample" and plain["moqe_vs_best"]["test"] == "mcnemar"
    v = r["moqe_vs_best"]
    assert v["test"] == "paired-bootstrap" and v["mcnemar_iid_p_value"] == plain["moqe_vs_best"]["p_value"]
    assert r["experts"]["a"]["top1"]["value"] == plain["experts"]["a"]["top1"]["value"]  # same point estimates
    assert "paired cluster-bootstrap p" in to_markdown(r) and "30 source images" in to_markdown(r)


def test_few_independent_units_warn():
    kw, best = _case()
    route = kw["loss"].argmin(1)
    assert build_split_report(**kw, route=route, best_expert=best, n_boot=200)["warnings"] == []
    r = build_split_report(**kw, route=route, best_expert=best, groups=np.repeat(np.arange(3), 40), n_boot=200)
    assert len(r["warnings"]) == 1 and "only 3 independent source images" in r["warnings"][0]
    assert "**Warning:** only 3 independent" in to_markdown(r)


def test_random_router_control_keeps_usage_and_loses_input_information():

    rng = np.random.default_rng(0)
    n, c = 400, 3
    labels = rng.integers(0, c, n)
    good = np.eye(c)[labels] * 5.0  # always right
    bad = np.eye(c)[(labels + 1) % c] * 5.0  # always wrong
    # Expert 0 is right on the first half, expert 1 on the second; the router knows which.
    ex = np.stack([np.where((np.arange(n) < n // 2)[:, None], good, bad),
                   np.where((np.arange(n) >= n // 2)[:, None], good, bad)]).astype(np.float32)
    loss = np.stack([-np.log(np.exp(e[np.arange(n), labels]) / np.exp(e).sum(1)) for e in ex], axis=1)
    route = (np.arange(n) >= n // 2).astype(np.int64)
    rep = build_split_report(fp_logits=good.astype(np.float32), expert_logits=ex, expert_names=["a", "b"],
                             labels=labels, loss=loss, route=route, best_expert=0, targets="labels", n_boot=200)
    assert rep["moqe"]["top1"]["value"] == 1.0
    assert 0.35 < rep["random_router"]["top1"]["value"] < 0.65  # same 50/50 mix, chance-level


def _copies(kw, best, n_copies=3, seed=5):
    """Copies of the best expert: its logits plus small independent noise."""
    rng = np.random.default_rng(seed)
    fp, y = kw["fp_logits"], kw["labels"]
    logits = [kw["expert_logits"][best] + 0.3 * rng.normal(size=fp.shape) for _ in range(n_copies)]
    loss = np.stack([sample_losses(l, fp, y, kw["targets"]) for l in logits], axis=1)
    pred = np.stack([l.argmax(-1) for l in logits], axis=1)
    return {"loss": loss, "pred": pred, "route": rng.integers(0, n_copies, len(fp)), "best": 0,
            "preset": "strongest", "names": [f"copy{i}" for i in range(n_copies)]}


def test_controls_strongest_mixture_copies_and_cost_matched():
    kw, best = _case(n=400)
    route = kw["loss"].argmin(1)  # an oracle router: its gain must beat the copies router's
    copies = _copies(kw, best)
    costs = {"a": 4.0, "b": 8.0, "c": 8.0}
    r = build_split_report(**kw, route=route, best_expert=best, n_boot=1000, strongest=NAMES[best],
                           expert_costs=costs, copies=copies)
    json.dumps(r)
    assert r["best_expert"]["chosen_on"] == "val"
    st = r["strongest_expert"]
    assert st["name"] == NAMES[best]
    assert st["distance_to_fp"]["diff"] == pytest.approx(st["top1"]["value"] - r["fp"]["top1"]["value"])
    c = r["controls"]
    assert c["random_router"] == r["random_router"]
    mix = np.mean([np.exp(e - e.max(-1, keepdims=True)) / np.exp(e - e.max(-1, keepdims=True)).sum(-1, keepdims=True)
                   for e in kw["expert_logits"]], axis=0)
    assert c["mixture"]["top1"]["value"] == pytest.approx((mix.argmax(-1) == kw["labels"]).mean())
    assert c["mixture"]["cost_experts_run"] == 3
    co = c["copies_oracle"]
    want = (copies["pred"][np.arange(400), copies["loss"].argmin(1)] == kw["labels"]).mean()
    assert co["top1"]["value"] == pytest.approx(want) and co["copies"] == 3 and co["best_copy"] == "copy0"
    assert co["oracle_gain"]["diff"] >= 0
    assert co["moqe_vs_copies"]["diff"] > 0 and co["moqe_vs_copies"]["p_value"] < 0.05
    cm = c["cost_matched"]
    usage = np.bincount(route, minlength=3) / 400
    assert cm["applicable"] and cm["moqe_expected_cost"] == pytest.approx(usage @ np.array([4.0, 8.0, 8.0]))
    assert cm["cheaper"] == "a" and cm["costlier"] in ("b", "c") and cm["chosen_on"] == "test"
    # With the build's validation losses the bracket is chosen on them, not on this split:
    # b and c cost the same, and whichever validation prefers is taken.
    for pick, other in (("b", "c"), ("c", "b")):
        r2 = build_split_report(**kw, route=route, best_expert=best, n_boot=200, expert_costs=costs,
                                expert_val_loss={"a": 0.5, pick: 0.1, other: 0.9})
        cm2 = r2["controls"]["cost_matched"]
        assert cm2["costlier"] == pick and cm2["chosen_on"] == "val"
    md = to_markdown(r)
    assert "copies oracle" in md and "Cost-matched" in md and "Strongest-preset expert" in md


def test_controls_without_copies_or_cost_differences():
    kw, best = _case()
    r = build_split_report(**kw, route=np.full(120, best), best_expert=best, n_boot=200,
                           expert_costs={n: 8.0 for n in NAMES})
    assert r["strongest_expert"] is None and r["controls"]["copies_oracle"] is None
    assert r["controls"]["cost_matched"]["applicable"] is False
    md = to_markdown(r)
    assert "No strongest-preset expert" in md and "not applicable" in md
