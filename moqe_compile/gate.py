"""The significance gate: whether a bundle serves its router or its best single expert
(docs/design.md#controls-and-the-gate).

One rule for every task, on plain numbers. Each comparison is oriented so that a positive
``gain`` means MoQE is better (a task whose metric is a loss passes the negated difference).
Routing is kept only if

1. MoQE beats the best single expert (chosen by loss on the gate's split) with a paired
   p-value strictly below ``alpha``,
2. its gain exceeds what routing gains from calibration noise alone (``copies_gain``: the
   copies router's gain over the best copy, or, without a copies router, the copies oracle's
   headroom, a stricter bar), when a copies control was built, and
3. it also significantly beats the single expert that is best on the headline metric, when
   that is another expert: otherwise a router that mostly serves that expert "wins" against
   a weaker default (docs/results.md#the-cost-aware-router-on-the-w2a8-layer-groups).

The gate's split (router_val) also chose the router's epoch and fallback: optimistic for
MoQE, so a refusal is conservative.
"""

from __future__ import annotations

from dataclasses import dataclass

ROUTED = "routed"
SINGLE = "single"  # bundles built before this spelling was shared wrote "single-expert" for LMs
RATE_METRICS = ("top1", "fp_top1_agreement")


@dataclass(frozen=True)
class Comparison:
    """MoQE against one single expert: ``gain`` > 0 means MoQE is better; ``p_value`` is the
    paired test's (None when the test does not apply to the metric)."""

    expert: str
    gain: float
    p_value: float | None


def format_gain(metric: str, v: float) -> str:
    if metric in RATE_METRICS:
        return f"{100 * v:+.2f} points"
    if metric == "mean_nll":
        return f"{v:+.4f} nats/token"
    return f"{v:+.4g}"


def significant(p: float | None, alpha: float) -> bool:
    """The gate's test: strictly below ``alpha`` (``p == alpha`` is refused)."""
    return p is not None and p < alpha


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def refusals(best: Comparison, alpha: float, metric: str, copies_gain: float | None = None,
             copies_control: str | None = None, headline: Comparison | None = None) -> list[str]:
    """Why routing is refused (empty: it is kept)."""
    reasons = []
    if not significant(best.p_value, alpha):
        reasons.append(f"paired test vs {best.expert}: p = {_p(best.p_value)} >= {alpha}")
    if not best.gain > 0:
        reasons.append(f"no gain over {best.expert} ({format_gain(metric, best.gain)})")
    if copies_gain is not None and not best.gain > copies_gain:
        reasons.append(f"gain {format_gain(metric, best.gain)} does not exceed the {copies_control}'s "
                       f"{format_gain(metric, copies_gain)}")
    if headline is not None and headline.expert != best.expert and not (
            headline.gain > 0 and significant(headline.p_value, alpha)):
        reasons.append(f"does not significantly beat {headline.expert}, the best single expert on {metric} "
                       f"({format_gain(metric, headline.gain)}, p = {_p(headline.p_value)})")
    return reasons


def decide(best: Comparison, alpha: float, force: bool, metric: str, copies_gain: float | None = None,
           copies_control: str | None = None, headline: Comparison | None = None,
           split: str = "router_val") -> dict:
    """The manifest's ``router.gate``: ``decision`` (``"routed"`` / ``"single"``), ``forced``,
    ``p_value``, ``val_gain``, ``metric``, ``threshold``, ``copies_val_gain``,
    ``copies_control``, ``reason``, ``split``."""
    reasons = refusals(best, alpha, metric, copies_gain, copies_control, headline)
    routed = not reasons
    if not routed:
        reason = "; ".join(reasons)
    elif copies_gain is not None:
        reason = (f"MoQE beats {best.expert} on {split} by {format_gain(metric, best.gain)} "
                  f"(p = {_p(best.p_value)} < {alpha}), more than the {copies_control}'s "
                  f"{format_gain(metric, copies_gain)}")
    else:
        reason = (f"MoQE beats {best.expert} on {split} by {format_gain(metric, best.gain)} "
                  f"(p = {_p(best.p_value)} < {alpha}); no copies control was built")
    gate = {"decision": ROUTED if routed else SINGLE, "p_value": best.p_value, "val_gain": best.gain,
            "metric": metric, "threshold": alpha, "copies_val_gain": copies_gain, "copies_control": copies_control,
            "reason": reason, "forced": False, "split": split}
    if force and not routed:
        gate.update(decision=ROUTED, forced=True,
                    reason=f"forced by --force-routing; the gate would have served the single expert: {reason}")
    return gate
