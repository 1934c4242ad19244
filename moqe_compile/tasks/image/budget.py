"""The image task's side of compiling to an accuracy budget: what a candidate is (an
:class:`ExpertRecipe` from a preset ladder, with its k most sensitive layers in higher
precision) and how one is built and measured on router_val. The search and the rule are
task-free (:mod:`moqe_compile.target`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moqe_compile import target as tg
from moqe_compile.backends import OrtCpuSession
from moqe_compile.evaluate.latency import tile_batch
from moqe_compile.tasks.image.config import ExpertRecipe
from moqe_compile.tasks.image.experts import build_expert, expert_cost
from moqe_compile.tasks.image.score import run_batched

# Cheapest first within a tier (all rungs of a tier cost the same; later rungs take longer to build).
INT8_LADDER = ("minmax", "percentile-99.999", "mse-bc", "strongest")
W4A8_LADDER = ("w4a8-minmax", "w4a8-mse", "w4a8-mse-bc", "w4a8-strongest")
LATENCY_REPEATS = 30


@dataclass(frozen=True)
class Spec:
    """A candidate: a preset and how many of the most sensitive layers it keeps in higher
    precision (FP for INT8 presets, 8 bits for W4A8 presets)."""

    preset: str
    k: int = 0


def tiers(cost: str, n_layers: int) -> list[tg.Tier]:
    """The candidate tiers for ``cost``, cheapest first."""
    def refine(s: Spec, k: int) -> Spec:
        return Spec(s.preset, k)

    int8 = tg.Tier([Spec(p) for p in INT8_LADDER], refine, n_layers - 1)
    if cost != "weight_bits":
        # On ONNX Runtime CPU a W4A8 expert holds its int4 values in int8 and runs the INT8
        # kernels: same graph size, same latency, so it is never cheaper in those costs.
        return [int8]
    return [tg.Tier([Spec(p) for p in W4A8_LADDER], refine, n_layers - 1), int8]


def recipe_for(spec: Spec, ranking: list[str]) -> ExpertRecipe:
    """The expert recipe of ``spec``; ``ranking``: Conv/Gemm node names, most sensitive first."""
    base = ExpertRecipe.from_preset(spec.preset, spec.preset)
    if not spec.k:
        return base
    kept = ranking[: spec.k]
    if base.weight_bits < 8:
        return ExpertRecipe.from_preset(f"{spec.preset}.8bit-{spec.k}", spec.preset, high_precision_nodes=kept)
    return ExpertRecipe.from_preset(f"{spec.preset}.fp-{spec.k}", spec.preset, exclude_nodes=kept)


def headline_vector(logits: np.ndarray, fp_logits: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Per-sample 0/1 vector of the headline metric: top-1 correct with labels, else agreement with FP."""
    target = labels if labels is not None else fp_logits.argmax(-1)
    return (logits.argmax(-1) == target).astype(np.float64)


class ImageBudget:
    """Builds and measures candidates of one image model on router_val."""

    def __init__(self, prepared: Path, input_name: str, calib_x: np.ndarray, val_x: np.ndarray,
                 val_labels: np.ndarray | None, val_groups, fp_val_logits: np.ndarray, work: Path,
                 ranking: list[str]):
        self.prepared, self.input_name, self.calib_x, self.work = prepared, input_name, calib_x, work
        self.val_x, self.labels, self.groups = val_x, val_labels, val_groups
        self.fp_vec = headline_vector(fp_val_logits, fp_val_logits, val_labels)
        self.fp_logits = fp_val_logits
        self.ranking = ranking
        self.paths: dict[str, Path] = {}
        self.recipes: dict[str, ExpertRecipe] = {}

    def evaluate(self, spec: Spec) -> tg.Candidate:
        r = recipe_for(spec, self.ranking)
        out = self.work / f"budget.{r.name}.onnx"
        t0 = time.perf_counter()
        build_expert(self.prepared, self.input_name, self.calib_x, r, ["onnxruntime-cpu"], {"onnxruntime-cpu": out},
                     self.work / f"budget.{r.name}.json", self.work)
        seconds = time.perf_counter() - t0
        sess = OrtCpuSession(r.name, out)
        logits = run_batched(sess, self.val_x)
        sess.close()
        val = tg.rate_drop(self.fp_vec, headline_vector(logits, self.fp_logits, self.labels), self.groups)
        kept = list(r.high_precision_nodes or r.exclude_nodes)
        cost = {"mean_weight_bits": expert_cost(self.prepared, list(r.exclude_nodes), r.weight_bits,
                                                r.high_precision_nodes, r.high_precision_ends),
                "bytes": out.stat().st_size}
        self.paths[r.name], self.recipes[r.name] = out, r
        return tg.Candidate(name=r.name, rung=spec.preset, recipe=r.to_dict(), val=val, cost=cost, kept=kept,
                            kept_as=("8-bit" if r.high_precision_nodes else "fp") if kept else "",
                            build_seconds=round(seconds, 2))

    def measure(self, cands: list[tg.Candidate], fp_path: Path, batches: list[int],
                repeats: int = LATENCY_REPEATS) -> dict:
        """Latency of every candidate and of FP, interleaved (``target.measure_costs``)."""
        sessions = {c.name: OrtCpuSession(c.name, self.paths[c.name]) for c in cands}
        fp = OrtCpuSession("fp", fp_path)

        def runner(sess):
            return lambda bs: (lambda x=tile_batch(self.val_x, bs): sess.run(x))

        try:
            return tg.measure_costs(cands, {n: runner(s) for n, s in sessions.items()}, runner(fp), batches, repeats)
        finally:
            for s in [*sessions.values(), fp]:
                s.close()


def sensitivity_ranking(prepared: Path, input_name: str, calib_x: np.ndarray, work: Path) -> list[dict]:
    """Layers most sensitive first (one layer INT8 at a time, KL to FP; ``quantize/sensitivity.py``)."""
    from moqe_compile.evaluate.losses import kl_to_fp
    from moqe_compile.quantize.sensitivity import layer_sensitivity

    return layer_sensitivity(prepared, input_name, calib_x, work, kl_to_fp, show_progress=False)


def run_budget(cfg_target, prepared: Path, fp_path: Path, input_name: str, calib_x: np.ndarray, val,
               fp_val_logits: np.ndarray, work: Path, say, sensitivity: list[dict] | None = None):
    """Search, measure, choose. Returns (budget, candidates, chosen index, fp latency, SearchResult);
    raises the BuildError of :func:`moqe_compile.target.no_fit_error` when nothing meets the budget."""
    from moqe_compile.quantize.graph import weight_layers
    import onnx

    n_layers = len(weight_layers(onnx.load(str(prepared))))
    sensitivity = sensitivity or sensitivity_ranking(prepared, input_name, calib_x, work)
    budget = ImageBudget(prepared, input_name, calib_x, val.x, val.labels, val.sources, fp_val_logits, work,
                         [s["node"] for s in sensitivity])
    res = tg.search(tiers(cfg_target.cost, n_layers), budget.evaluate, cfg_target.max_drop,
                    60 * cfg_target.search_minutes, say)
    unit = "top-1 points" if val.labels is not None else "FP-agreement points"
    if not any(c.meets for c in res.candidates):
        raise tg.no_fit_error(res.candidates, cfg_target.max_drop, unit, res.timed_out)
    batches = sorted({1, cfg_target.batch})
    fp_ms = budget.measure(res.candidates, fp_path, batches)
    chosen = tg.choose(res.candidates, cfg_target.cost, cfg_target.batch)
    return budget, res, chosen, fp_ms, unit


def default_expert(budget: dict | None, names: list[str], val_loss: np.ndarray, strongest: str | None,
                   alpha: float, groups) -> tuple[int, dict]:
    """The single expert a bundle serves without routing, and the rule that chose it."""
    if budget:
        return names.index(budget["expert"]), {
            "rule": "budget", "reason": f"the cheapest candidate whose router_val drop interval is within "
                                        f"max_drop = {budget['manifest']['max_drop']} ({budget['manifest']['cost']})"}
    return tg.choose_default(val_loss, names, strongest, alpha, groups)


def _append_scores(st, name: str) -> None:
    """Score the expert just added to ``st.experts`` on every scored split (a new column)."""
    from moqe_compile.evaluate.losses import sample_losses
    from moqe_compile.tasks.image.score import Scores

    sess = OrtCpuSession(name, st.w.path(st.experts[-1]["variants"][st.backend]["path"]))
    for s, sc in st.scores.items():
        d = st.splits[s]
        logits = run_batched(sess, d.x)
        loss = sample_losses(logits, sc.fp_logits, d.labels, st.cfg.data.targets)
        st.scores[s] = Scores(sc.fp_logits, np.concatenate([sc.expert_logits, logits[None]]),
                              np.concatenate([sc.loss, loss[:, None]], 1))
    sess.close()


def budget_step(st) -> dict:
    """The image build's ``target`` step (``tasks/image/steps.py``): search, choose, add the chosen
    candidate to the bundle's experts, evaluate it once on test, write the frontier report."""
    from dataclasses import replace

    t = st.cfg.target
    if st.sensitivity is None:
        st.sensitivity = sensitivity_ranking(st.prepared, st.fp.input_name, st.splits["calibration"].x, st.work)
    budget, res, chosen, fp_ms, unit = run_budget(t, st.prepared, st.fp.path, st.fp.input_name,
                                                  st.splits["calibration"].x, st.splits["router_val"],
                                                  st.scores["router_val"].fp_logits, st.work, st.st.say,
                                                  st.sensitivity)
    c = res.candidates[chosen]
    taken = {e["name"] for e in st.experts}
    name = c.name if c.name not in taken else f"budget-{c.name}"
    st.budget_recipe = replace(budget.recipes[c.name], name=name)  # the served baseline: the copies repeat it
    st.experts.append(st._expert(st.budget_recipe))  # every backend, into the bundle
    _append_scores(st, name)
    te, sc = st.splits["test"], st.scores["test"]
    drop = tg.rate_drop(headline_vector(sc.fp_logits, sc.fp_logits, te.labels),
                        headline_vector(sc.expert_logits[-1], sc.fp_logits, te.labels), te.sources)
    test = tg.held_on_test(drop, t.max_drop)
    st.st.say(f"target: chose {c.name}; on test drop {drop['drop']:.3f} [{drop['ci95'][0]:.3f}, "
              f"{drop['ci95'][1]:.3f}]: budget {'held' if test['held'] else 'did NOT hold'}")
    return tg.publish(st.w.path, res, chosen, c, t, unit, fp_ms, test, name)


def gate_within_budget(st, gate: dict) -> dict:
    """A routed bundle must meet the same budget on router_val at an expected cost (usage-weighted
    mean weight bits of its experts) no higher than the budget expert's; otherwise it serves the
    budget expert. Forced routing stays forced."""
    if gate["decision"] != "routed" or gate.get("forced"):
        return gate
    m = st.budget["manifest"]
    va, d = st.scores["router_val"], st.splits["router_val"]
    route = st.route(d.x).astype(np.int64)
    idx = np.arange(len(route))
    routed = tg.rate_drop(headline_vector(va.fp_logits, va.fp_logits, d.labels),
                          headline_vector(va.expert_logits[route, idx], va.fp_logits, d.labels), d.sources)
    bits = np.array([e["cost"]["mean_weight_bits"] for e in st.experts])
    reasons = tg.routed_within(routed, m["max_drop"], float(bits[route].mean()),
                               float(bits[[e["name"] for e in st.experts].index(m["expert"])]))
    if not reasons:
        return {**gate, "budget": {"routed_val_drop": routed}}
    return {**gate, "decision": "single", "budget": {"routed_val_drop": routed},
            "reason": gate["reason"] + "; but under the accuracy budget " + "; ".join(reasons)}
