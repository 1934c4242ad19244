"""Perplexity report, its controls and the routing gate on synthetic loss matrices (numpy only)."""

from __future__ import annotations

import numpy as np

from moqe_compile.tasks.causal_lm.report import corpus_choice_on, gate_decision, lm_split_report, render_lm_markdown


def _case(n=300, seed=0):
    """Two experts, each better by 0.1 nats on its own half of the windows; the router is the oracle."""
    rng = np.random.default_rng(seed)
    fp = rng.normal(3.0, 0.3, n)
    half = np.arange(n) % 2
    loss = fp[:, None] + 0.05 + 0.1 * np.stack([half, 1 - half], 1) + rng.normal(0, 0.01, (n, 2))
    return fp, loss, np.array(["wiki", "c4"] * (n // 2)), loss.argmin(1)


def test_report_oracle_routes_and_intervals():
    rng = np.random.default_rng(0)
    n = 200
    fp = rng.normal(3.0, 0.3, n)
    loss = fp[:, None] + np.abs(rng.normal(0.05, 0.03, (n, 3)))
    corpus = np.array(["wiki", "c4"] * (n // 2))
    oracle_route = loss.argmin(1)
    rep = lm_split_report(fp, loss, ["a", "b", "c"], oracle_route, 0, corpus, n_boot=500)
    o = rep["overall"]
    assert o["moqe"]["ppl"] == o["oracle"]["ppl"] and o["router_accuracy"] == 1.0
    assert o["moqe_vs_best"]["diff"] < 0 and o["moqe_vs_best"]["headroom_captured"] == 1.0
    for r in [o["fp"], o["oracle"], *o["experts"].values()]:
        assert r["ppl_ci95"][0] <= r["ppl"] <= r["ppl_ci95"][1]
    assert np.isclose(o["fp"]["ppl"], np.exp(fp.mean()))
    assert set(rep["per_corpus"]) == {"wiki", "c4"}
    assert "| MoQE |" in render_lm_markdown(rep, "t")
    assert o["controls"]["copies_oracle"] is None  # none given: reported as absent, not invented


def test_controls_random_router_mixture_copies_and_cost():
    fp, loss, corpus, route = _case()
    n = len(fp)
    rng = np.random.default_rng(3)
    copies = {"of": "a", "names": ["copy0", "copy1"], "best": 0,
              "loss": loss[:, :1] + rng.normal(0, 0.01, (n, 2)), "route": rng.integers(0, 2, n)}
    mix = loss.mean(1) - 0.01
    rep = lm_split_report(fp, loss, ["a", "b"], route, 0, corpus, n_boot=500, mix=mix, copies=copies,
                          costs={"a": 4.0, "b": 8.0}, val_loss={"a": 3.1, "b": 3.2})
    c = rep["overall"]["controls"]
    # The shuffled router keeps MoQE's usage but loses its input information: ~half the gain.
    assert c["random_router"]["mean_nll"] > rep["overall"]["moqe"]["mean_nll"] + 0.03
    assert np.isclose(c["mixture"]["mean_nll"], mix.mean()) and c["mixture"]["cost_experts_run"] == 2
    co = c["copies_oracle"]
    assert co["oracle_gain"]["diff"] < 0 and co["copies"] == 2
    # MoQE gains ~0.05 nats over the best single; a random copies router gains ~0: diff-in-diff < 0.
    assert co["moqe_vs_copies"]["diff"] < -0.03 and co["moqe_vs_copies"]["p_value"] < 0.01
    cm = c["cost_matched"]
    assert cm["applicable"] and np.isclose(cm["moqe_expected_cost"], 6.0, atol=0.5)
    same = lm_split_report(fp, loss, ["a", "b"], route, 0, corpus, n_boot=200, costs={"a": 4.0, "b": 4.0})
    assert not same["overall"]["controls"]["cost_matched"]["applicable"]
    md = render_lm_markdown(rep, "t")
    assert "copies router" in md and "random router" in md and "mixture" in md


def test_corpus_controls_say_whether_the_router_learned_more_than_the_domain():
    fp, loss, corpus, route = _case()  # expert a is better on wiki, b on c4: the domain is everything
    assert corpus_choice_on(loss, corpus) == {"wiki": 0, "c4": 1}
    rep = lm_split_report(fp, loss, ["a", "b"], route, 0, corpus, n_boot=500, corpus_choice={"wiki": 0, "c4": 1})
    c = rep["overall"]["controls"]
    tc, po = c["true_corpus"], c["corpus_oracle"]
    assert tc["usage"] == {"a": 0.5, "b": 0.5} and np.isclose(tc["mean_nll"], po["mean_nll"])
    assert tc["vs_best"]["diff"] < -0.03  # knowing the domain gains what routing gains here
    assert abs(tc["moqe_vs_this"]["diff"]) < 0.01  # MoQE (the oracle route) gains nothing beyond it
    # A corpus choice made on other data that is wrong: MoQE beats it by the full 0.1 nats.
    wrong = lm_split_report(fp, loss, ["a", "b"], route, 0, corpus, n_boot=500,
                            corpus_choice={"wiki": 1, "c4": 0})["overall"]["controls"]["true_corpus"]
    assert wrong["moqe_vs_this"]["diff"] < -0.08 and wrong["moqe_vs_this"]["p_value"] < 0.01
    # Inside one corpus the true-corpus router is one expert; without a choice only the oracle.
    assert rep["per_corpus"]["c4"]["controls"]["true_corpus"]["usage"]["b"] == 1.0
    no_choice = lm_split_report(fp, loss, ["a", "b"], route, 0, corpus, n_boot=200)["overall"]["controls"]
    assert "true_corpus" not in no_choice and "corpus_oracle" in no_choice
    one = lm_split_report(fp, loss, ["a", "b"], route, 0, np.array(["wiki"] * len(fp)), n_boot=200)
    assert "corpus_oracle" not in one["overall"]["controls"]
    md = render_lm_markdown(rep, "t")
    assert "true-corpus router" in md and "per-corpus oracle" in md


def _val(route_gain: bool, copies_route):
    fp, loss, corpus, route = _case(seed=1)
    if not route_gain:
        route = np.zeros(len(fp), np.int64)
    n = len(fp)
    rng = np.random.default_rng(5)
    closs = loss[:, :1] + 0.2 * np.stack([np.arange(n) % 2, 1 - np.arange(n) % 2], 1) + rng.normal(0, 0.01, (n, 2))
    cr = closs.argmin(1) if copies_route == "oracle" else np.zeros(n, np.int64)
    copies = {"of": "a", "names": ["c0", "c1"], "best": 0, "loss": closs, "route": cr}
    return lm_split_report(fp, loss, ["a", "b"], route, 0, corpus, n_boot=500, copies=copies)


def test_gate_needs_a_significant_gain_beyond_the_copies_router():
    assert gate_decision(_val(True, "none"), 0.05, False)["decision"] == "routed"
    no_gain = gate_decision(_val(False, "none"), 0.05, False)
    assert no_gain["decision"] == "single" and not no_gain["forced"]
    # The copies router gains as much from calibration noise alone: routing refused.
    noise = gate_decision(_val(True, "oracle"), 0.05, False)
    assert noise["decision"] == "single" and "copies router" in noise["reason"]
    forced = gate_decision(_val(False, "none"), 0.05, True)
    assert forced["decision"] == "routed" and forced["forced"]
    assert set(forced) >= {"decision", "forced", "p_value", "val_gain", "metric", "threshold", "copies_val_gain",
                           "copies_control", "reason", "test", "split"} and forced["metric"] == "mean_nll"
