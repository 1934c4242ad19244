"""Perplexity report and routing gate on synthetic loss matrices (numpy only)."""

from __future__ import annotations

import numpy as np

from moqe_compile.evaluate.lm import lm_split_report, render_lm_markdown
from moqe_compile.lm_pipeline import gate_decision


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


def test_gate_needs_a_significant_gain():
    rng = np.random.default_rng(1)
    best = rng.normal(3, 0.2, 300)
    assert gate_decision(best - 0.05, best, 0.05, False)["decision"] == "routed"
    same = gate_decision(best + rng.normal(0, 0.01, 300), best, 0.05, False)
    assert same["decision"] == "single-expert" and not same["forced"]
    forced = gate_decision(best + 0.05, best, 0.05, True)
    assert forced["decision"] == "routed" and forced["forced"]
