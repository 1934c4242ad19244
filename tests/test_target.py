"""The accuracy-budget rule, search and choice (moqe_compile/target.py), on hand-made candidates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moqe_compile import target as tg
from moqe_compile.errors import BuildError


def cand(name: str, hi: float, drop: float | None = None, bits: float = 8.0, ms: float | None = None, **kw):
    cost = {"mean_weight_bits": bits, "bytes": int(bits * 1000)}
    if ms is not None:
        cost["latency_ms"] = {"1": ms}
    d = hi / 2 if drop is None else drop
    return tg.Candidate(name=name, rung=name, recipe={}, val={"drop": d, "ci95": [d - (hi - d), hi], "n": 100},
                        cost=cost, **kw)


# --- the rule -------------------------------------------------------------------------------

def test_rule_boundary_upper_end_equal_to_budget_meets_and_just_above_does_not():
    assert tg.meets([-0.2, 0.3], 0.3)
    assert not tg.meets([-0.2, math.nextafter(0.3, 1)], 0.3)
    # The point estimate inside the budget is not enough: the interval's upper end decides.
    assert tg.meets_point(0.1, 0.3) and not tg.meets([-0.1, 0.31], 0.3)


def test_rate_drop_point_is_the_share_of_lost_samples_in_points():
    fp = np.ones(200)
    q = np.ones(200)
    q[:3] = 0  # three samples lost: 1.5 points
    d = tg.rate_drop(fp, q)
    assert d["drop"] == pytest.approx(1.5) and d["n"] == 200
    lo, hi = d["ci95"]
    assert 0 <= lo <= 1.5 <= hi  # one-sided losses: the interval cannot go below 0


def test_identical_outputs_have_a_zero_interval_and_meet_any_positive_budget():
    v = (np.arange(50) % 3 == 0).astype(float)
    d = tg.rate_drop(v, v)
    assert d["drop"] == 0 and d["ci95"] == [0, 0] and tg.meets(d["ci95"], 1e-9)


def test_perplexity_drop_is_the_percent_increase_of_exp_mean_nll():
    nll_fp = np.full(40, 2.0)
    nll_q = np.full(40, 2.0 + math.log(1.05))  # exactly 5% more perplexity on every window
    d = tg.perplexity_drop(nll_fp, nll_q)
    assert d["drop"] == pytest.approx(5.0) and d["ci95"] == pytest.approx([5.0, 5.0])


# --- the search -----------------------------------------------------------------------------

def fake(table: dict):
    """evaluate(spec) from a table spec -> drop upper end (spec: (rung, k))."""
    calls = []

    def evaluate(spec):
        calls.append(spec)
        return cand(f"{spec[0]}.{spec[1]}", table[spec])
    return evaluate, calls


def refine(spec, k):
    return (spec[0], k)


def test_search_stops_at_the_first_rung_that_meets():
    ev, calls = fake({("a", 0): 0.5, ("b", 0): 0.2, ("c", 0): 0.1})
    res = tg.search([tg.Tier([("a", 0), ("b", 0), ("c", 0)])], ev, 0.3, 60)
    assert calls == [("a", 0), ("b", 0)] and not res.timed_out
    assert [c.meets for c in res.candidates] == [False, True]


def test_refinement_doubles_then_bisects_to_the_smallest_k_on_the_best_rung():
    # rung "b" is closer (0.6 < 0.9); with k layers kept its drop falls; k = 5 is the first to meet 0.3.
    table = {("a", 0): 0.9, ("b", 0): 0.6, **{("b", k): 0.6 - 0.07 * k for k in range(1, 21)}}
    ev, calls = fake(table)
    res = tg.search([tg.Tier([("a", 0), ("b", 0)], refine, 20)], ev, 0.3, 60)
    ks = [k for r, k in calls if r == "b" and k]
    assert ks == [1, 2, 4, 8, 6, 5]  # doubling to 8 (meets), bisection down to 5
    met = [c for c in res.candidates if c.meets]
    assert min(int(c.name.split(".")[1]) for c in met) == 5
    assert len(calls) < 2 + 20  # not brute force


def test_a_cheaper_tier_that_meets_ends_the_search_before_dearer_tiers():
    ev, calls = fake({("w4", 0): 0.2, ("int8", 0): 0.0})
    tg.search([tg.Tier([("w4", 0)], refine, 3), tg.Tier([("int8", 0)])], ev, 0.3, 60)
    assert calls == [("w4", 0)]


def test_refinement_reaching_max_k_without_meeting_moves_to_the_next_tier():
    table = {("w4", 0): 0.9, ("w4", 1): 0.8, ("w4", 2): 0.7, ("w4", 3): 0.6, ("int8", 0): 0.1}
    ev, calls = fake(table)
    res = tg.search([tg.Tier([("w4", 0)], refine, 3), tg.Tier([("int8", 0)])], ev, 0.3, 60)
    assert calls == [("w4", 0), ("w4", 1), ("w4", 2), ("w4", 3), ("int8", 0)]
    assert res.candidates[-1].meets


def test_deadline_stops_the_search_and_says_so():
    t = iter(range(0, 1000, 10))  # each clock read advances 10 s
    ev, calls = fake({(r, 0): 0.9 for r in "abcdef"})
    res = tg.search([tg.Tier([(r, 0) for r in "abcdef"])], ev, 0.3, 25, clock=lambda: next(t))
    assert res.timed_out and 1 <= len(calls) < 6


# --- the choice -----------------------------------------------------------------------------

def test_choice_is_the_lowest_cost_among_those_that_meet():
    cs = [cand("cheap-miss", 0.5, bits=4), cand("mid", 0.2, bits=5), cand("dear", 0.0, bits=8)]
    for c in cs:
        c.meets = tg.meets(c.val["ci95"], 0.3)
    assert cs[tg.choose(cs, "weight_bits")].name == "mid"


def test_latency_ties_within_three_percent_go_to_the_smaller_drop():
    cs = [cand("a", 0.25, ms=1.00), cand("b", 0.05, ms=1.02), cand("c", 0.0, ms=1.2)]
    for c in cs:
        c.meets = True
    assert cs[tg.choose(cs, "latency")].name == "b"
    assert cs[tg.choose(cs, "latency", tie=0.0)].name == "a"


def test_no_candidate_meets_gives_none_and_an_error_naming_the_closest():
    cs = [cand("w4a8-minmax", 0.9), cand("strongest.fp-2", 0.41, drop=0.12), cand("minmax", 0.6)]
    assert tg.choose(cs, "latency") is None
    err = tg.no_fit_error(cs, 0.3, "top-1 points", timed_out=False)
    assert isinstance(err, BuildError)
    msg = str(err)
    assert "strongest.fp-2" in msg and "0.120" in msg and "0.410" in msg and "0.3" in msg
    assert "larger budget" in msg and "Nothing was written" in msg


def test_quantized_but_slower_than_fp_is_flagged_from_the_measured_medians():
    cs = [cand("fast", 0.1, ms=0.8), cand("slow", 0.1, ms=1.3), cand("equal", 0.1, ms=1.0)]
    tg.flag_slower(cs, {"1": 1.0})
    assert [c.slower_than_fp for c in cs] == [False, True, True]
    doc = tg.frontier(cs, 0, {"max_drop": 0.3, "cost": "latency", "batch": 1, "search_minutes": 1.0}, "points",
                      {"1": 1.0}, 1.0, False)
    md = tg.frontier_markdown(doc)
    slow_rows = [line for line in md.splitlines() if "slower than FP" in line]
    assert len(slow_rows) == 2 and not any(line.startswith("| fast ") for line in slow_rows)


# --- the single expert a bundle serves ------------------------------------------------------

def test_default_keeps_the_strongest_unless_another_is_significantly_better():
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 0.05, 400)
    far = np.stack([base * 0.5, base], 1)  # expert 0 halves every loss
    k, rule = tg.choose_default(far, ["minmax", "strongest"], "strongest", 0.05)
    assert (k, rule["rule"]) == (0, "significantly-better") and rule["p_value"] < 0.05
    # Lower on average (by 0.0025) but with per-sample differences of +-0.1: not significant.
    d = np.array([0.1, -0.105] * 10)
    near = np.stack([base[:20] + d, base[:20]], 1)
    assert near[:, 0].mean() < near[:, 1].mean()
    k, rule = tg.choose_default(near, ["minmax", "strongest"], "strongest", 0.05)
    assert (k, rule["rule"]) == (1, "strongest") and rule["p_value"] >= 0.05


def test_default_without_a_strongest_expert_is_the_lowest_val_loss():
    loss = np.array([[0.3, 0.2], [0.5, 0.1]])
    assert tg.choose_default(loss, ["a", "b"], None, 0.05) == (1, {"rule": "lowest-val-loss", "reason": pytest.approx(
        "no strongest-preset expert in the menu: the lowest router_val loss")})
