"""The causal-LM significance gate (being merged into ``moqe_compile/gate.py``)."""

from __future__ import annotations


def gate_decision(val: dict, p_value: float, force: bool) -> dict:
    """``router.gate`` from the router_val report block (mean token NLL; lower is better).

    As for images (evaluate/controls.py): routing is kept only if MoQE beats the best single
    expert with a paired bootstrap p below ``p_value`` *and* gains more than the router trained
    on the copies gains over the best copy (calibration noise alone); without a copies router,
    more than the copies oracle's headroom; without copies, the first test only."""
    t = val["moqe_vs_best"]
    gain = -float(t["diff"])  # NLL saved per token
    co = (val.get("controls") or {}).get("copies_oracle")
    copies_gain = kind = None
    if co:
        if co.get("router"):
            copies_gain, kind = -float(co["router"]["vs_best_copy"]["diff"]), "copies router"
        else:
            copies_gain, kind = -float(co["oracle_gain"]["diff"]), "copies oracle headroom"
    reasons = []
    if not t["p_value"] < p_value:
        reasons.append(f"paired test vs the best single expert: p = {t['p_value']:.3g} >= {p_value}")
    if not gain > 0:
        reasons.append(f"no gain over the best single expert ({-gain:+.4f} nats/token)")
    if copies_gain is not None and not gain > copies_gain:
        reasons.append(f"gain {gain:+.4f} nats/token does not exceed the {kind}'s {copies_gain:+.4f}")
    wins = not reasons
    head = f"router_val MoQE − best single = {t['diff']:+.4f} nats/token, p = {t['p_value']:.3g}"
    if wins:
        tail = (f"routing kept: more than the {kind}'s gain {copies_gain:+.4f}" if kind
                else "routing kept; no copies control was built")
    else:
        tail = "; ".join(reasons)
    gate = {"decision": "routed" if wins else "single-expert", "forced": False, "p_value": float(t["p_value"]),
            "val_gain": gain, "metric": "mean_nll", "threshold": p_value, "copies_val_gain": copies_gain,
            "copies_control": kind, "reason": f"{head}; {tail}", "test": t, "split": "router_val"}
    if force and not wins:
        gate.update(decision="routed", forced=True,
                    reason=f"forced by --force-routing; the gate would have served the single expert: {head}; {tail}")
    return gate
