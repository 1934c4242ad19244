"""The causal-LM side of compiling to an accuracy budget: the weight-only ladder 4-bit g128 ->
g64 -> g32 (our GPTQ into ``MatMulNBits``), then the best 4-bit rung with its k most sensitive
MatMuls at 8 bits, then 8-bit; each candidate scored on the router_val windows against FP in
percent perplexity. Sensitivity: each MatMul's relative output error at 4 bits under its input
Hessian (``quantize/gptq.py``'s ``matmul_sensitivity``). The search and the rule are task-free
(:mod:`moqe_compile.target`)."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from moqe_compile import target as tg
from moqe_compile.tasks.causal_lm.config import FLOAT_HEAD, LMExpertRecipe, expert_from_dict
from moqe_compile.tasks.causal_lm.score import DecoderSession, score_windows

LADDER_4BIT = (("w4-gptq", 128), ("w4-gptq", 64), ("w4-gptq", 32))
LADDER_8BIT = (("w8-gptq", 128),)
UNIT = "percent perplexity"
LATENCY_REPEATS = 10


@dataclass(frozen=True)
class Spec:
    """A candidate: a preset at a group size, with its ``k`` most sensitive MatMuls at 8 bits."""

    preset: str
    block: int
    k: int = 0


def tiers(n_matmuls: int) -> list[tg.Tier]:
    """The 4-bit rungs (refined by keeping MatMuls at 8 bits), then 8-bit."""
    def refine(s: Spec, k: int) -> Spec:
        return Spec(s.preset, s.block, k)

    return [tg.Tier([Spec(*r) for r in LADDER_4BIT], refine, max(0, n_matmuls - 1)),
            tg.Tier([Spec(*r) for r in LADDER_8BIT])]


def recipe_for(spec: Spec, ranking: list[str] = ()) -> LMExpertRecipe:
    """The expert recipe of ``spec``; ``ranking``: MatMul node names, most sensitive first."""
    name = f"{spec.preset}-g{spec.block}" + (f".8bit-{spec.k}" if spec.k else "")
    kept = {"high_precision_nodes": list(ranking[: spec.k])} if spec.k else {}
    return expert_from_dict({"name": name, "preset": spec.preset, "block_size": spec.block, **kept})


def nominal_bits(r: LMExpertRecipe, graph: Path) -> float:
    """Mean bits per weight of the written ``graph`` (the LM head at its own width, quantize/nbits.py's
    ``graph_weight_bits``) plus one float32 scale per block of MatMulNBits."""
    from moqe_compile.quantize.nbits import graph_weight_bits

    return round(graph_weight_bits(graph)["mean_weight_bits"] + (32 / r.block_size if r.scheme == "nbits" else 0.0), 4)


def default_expert(budget: dict | None, names: list[str], val_loss: np.ndarray, alpha: float) -> tuple[int, dict]:
    """The single expert a bundle serves without routing, and the rule that chose it (LM menus
    have no strongest preset: the lowest router_val loss, unless a budget chose)."""
    if budget:
        m = budget["manifest"]
        return names.index(m["expert"]), {"rule": "budget", "reason": f"the cheapest candidate whose router_val "
                                          f"drop interval is within max_drop = {m['max_drop']} ({m['cost']})"}
    return tg.choose_default(val_loss, names, None, alpha)


def budget_step(st) -> dict:
    """The LM build's ``target`` step (``tasks/causal_lm/steps.py``): search the ladder on
    router_val, add the chosen candidate to the experts, evaluate it once on test, write the
    frontier report."""
    t = st.cfg.target
    dims = (st.spec.layers, st.spec.kv_heads, st.spec.head_dim)
    fp = DecoderSession("fp", st.w.path("fp/model.onnx"), *dims)
    val = st.splits["router_val"].ids
    paths: dict[str, Path] = {}
    recipes: dict[str, LMExpertRecipe] = {}
    fp_nll = score_windows(fp, [], val, mix_of=0).nll  # FP once: candidates score only their own loss

    ranking: dict[int, list[str]] = {}
    other, n_ranked = _ranked_matmuls(st)

    def ranked(spec: Spec) -> list[str]:
        if spec.k and spec.block not in ranking:
            ranking[spec.block] = _ranking(st, recipe_for(Spec(spec.preset, spec.block)), other)
        return ranking.get(spec.block, [])

    def evaluate(spec: Spec) -> tg.Candidate:
        r = recipe_for(spec, ranked(spec))
        dest = st.work / f"budget.{r.name}.onnx"
        t0 = time.perf_counter()
        st._quantize_one(r, st._calib_ids(r), dest)  # noqa: SLF001 - the plug-in's own builder
        seconds = time.perf_counter() - t0
        sc = score_windows(None, [DecoderSession(r.name, dest, *dims)], val, mix_of=0)
        paths[r.name], recipes[r.name] = dest, r
        return tg.Candidate(name=r.name, rung=f"{spec.preset}-g{spec.block}", recipe=asdict(r),
                            val=tg.perplexity_drop(fp_nll, sc.loss[:, 0]),
                            cost={"mean_weight_bits": nominal_bits(r, dest), "bytes": _bytes(dest)},
                            kept=list(r.high_precision_nodes), kept_as="8-bit" if spec.k else "",
                            build_seconds=round(seconds, 2))

    res = tg.search(tiers(n_ranked), evaluate, t.max_drop, 60 * t.search_minutes, st.st.say)
    if not any(c.meets for c in res.candidates):
        raise tg.no_fit_error(res.candidates, t.max_drop, UNIT, res.timed_out)
    fp_ms = _measure(res.candidates, paths, fp, dims, val, sorted({1, t.batch}))
    chosen = tg.choose(res.candidates, t.cost, t.batch)
    c = res.candidates[chosen]
    taken = {e["name"] for e in st.experts}
    name = c.name if c.name not in taken else f"budget-{c.name}"
    rel = f"experts/{name}/onnxruntime-cpu.onnx"
    _copy_graph(paths[c.name], st.w.path(rel))
    from moqe_compile.quantize.nbits import check_kernels

    check = check_kernels(st.w.path(rel), allow_fp_head=recipes[c.name].head_bits == FLOAT_HEAD, allow_fp=st.gates)
    st.budget_recipe = replace(recipes[c.name], name=name)  # the served baseline: the copies repeat it
    st.experts.append({"name": name, "recipe": st.budget_recipe.to_dict(),
                       "variants": {"onnxruntime-cpu": {"path": rel, "kernels": check["kernels"], "check": check}},
                       "build_seconds": c.build_seconds})
    te = score_windows(fp, [DecoderSession(name, st.w.path(rel), *dims)], st.splits["test"].ids, mix_of=0)
    test = tg.held_on_test(tg.perplexity_drop(te.nll, te.loss[:, 0]), t.max_drop)
    st.st.say(f"target: chose {c.name}; on test +{test['drop']:.2f}% perplexity [{test['ci95'][0]:.2f}, "
              f"{test['ci95'][1]:.2f}]: budget {'held' if test['held'] else 'did NOT hold'}")
    return tg.publish(st.w.path, res, chosen, c, t, UNIT, fp_ms, test, name)


def _ranked_matmuls(st) -> tuple[set[str], int]:
    """(the MatMuls never ranked: the head, which has its own key head_bits, and an MoE's gates;
    how many the ranking holds), from one read of the FP decoder's graph."""
    import onnx

    from moqe_compile.quantize.nbits import const_matmuls, lm_head_node

    path = st.w.path("fp/model.onnx")
    other = set(st.gates) | {lm_head_node(path)}
    return other, len(const_matmuls(onnx.load(str(path), load_external_data=False), other)[0])


def _ranking(st, r: LMExpertRecipe, other: set[str]) -> list[str]:
    """MatMul names but ``other``, most sensitive at ``r``'s 4-bit grid first, on ``r``'s calibration windows."""
    from moqe_compile.quantize.gptq import matmul_sensitivity
    from moqe_compile.tasks.causal_lm.steps import calib_feeds

    sens = matmul_sensitivity(st.w.path("fp/model.onnx"), calib_feeds(st._calib_ids(r), st.spec),  # noqa: SLF001
                              r.bits, r.block_size, r.symmetric, other)
    st.st.say(f"target: MatMul sensitivity at {r.bits} bits g{r.block_size}: most sensitive "
              + ", ".join(f"{n} {v:.3g}" for n, v in sorted(sens.items(), key=lambda kv: -kv[1])[:3]))
    return sorted(sens, key=lambda n: -sens[n])


def _bytes(path: Path) -> int:
    """The graph and its external data file, if any."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _copy_graph(src: Path, dest: Path) -> None:
    import onnx

    # Loading and saving brings any external data along under the bundle's own file name.
    dest.parent.mkdir(parents=True, exist_ok=True)
    if any(p != src for p in src.parent.glob(src.name + "*")):
        onnx.save(onnx.load(str(src)), str(dest))
    else:
        shutil.copyfile(src, dest)


def _measure(cands, paths: dict, fp: DecoderSession, dims, val: np.ndarray, batches: list[int]) -> dict:
    """Latency of one forward pass over whole windows (the scoring path), interleaved with FP."""
    sessions = {c.name: DecoderSession(c.name, paths[c.name], *dims) for c in cands}

    def runner(sess):
        return lambda bs: (lambda x=np.ascontiguousarray(np.resize(val, (bs, val.shape[1]))): sess.logits(x))

    return tg.measure_costs(cands, {n: runner(s) for n, s in sessions.items()}, runner(fp), batches,
                            LATENCY_REPEATS)


def gate_within_budget(st, gate: dict) -> dict:
    """A routed LM bundle must meet the budget on router_val at an expected mean weight width no
    higher than the budget expert's; otherwise it serves the budget expert."""
    if gate["decision"] != "routed" or gate.get("forced"):
        return gate
    m = st.budget["manifest"]
    va = st.scores["router_val"]
    route = np.asarray(st.routes["router_val"]).astype(np.int64)
    routed = tg.perplexity_drop(va.nll, va.loss[np.arange(len(route)), route])
    names = [e["name"] for e in st.experts]
    bits = np.array([st.costs[n] for n in names])
    reasons = tg.routed_within(routed, m["max_drop"], float(bits[route].mean()), float(bits[names.index(m["expert"])]))
    if not reasons:
        return {**gate, "budget": {"routed_val_drop": routed}}
    return {**gate, "decision": "single", "budget": {"routed_val_drop": routed},
            "reason": gate["reason"] + "; but under the accuracy budget " + "; ".join(reasons)}
