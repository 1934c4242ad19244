"""``moqe-compile eval``: re-score a bundle on data and write an honest report.

Runs the FP model (the bundle's ``fp/model.onnx``), every expert and the router through the
runtime's sessions, builds the per-sample loss matrix (the build's ``targets``: KL to FP, or
cross-entropy where the data has labels), and reports FP, every expert, the oracle and MoQE
with bootstrap intervals and a paired test of MoQE vs the best single expert. The best
expert is the bundle's ``routing.default_expert``, chosen on the router_val split at build
time -- never on the data evaluated here. Output goes to a directory *outside* the bundle
(default ``<bundle>-eval/``): a hashed bundle is never modified.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from moqe_compile.errors import BundleError, InputError
from moqe_compile.tasks.image.score import sample_losses
from moqe_compile.tasks.image.eval_data import EVAL_SPLITS, load_eval_data, load_user_data
from moqe_compile.evaluate.report import build_split_report, to_markdown, write_plots
from moqe_compile.evaluate.stats import DEFAULT_RESAMPLES, DEFAULT_SEED


def default_out(bundle: str | Path) -> Path:
    b = Path(bundle).resolve()
    return b.with_name(b.name + "-eval")


def _batched(fn, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([fn(np.ascontiguousarray(x[i : i + batch])) for i in range(0, len(x), batch)])


def evaluate_bundle(bundle: str | Path, data: str = "test", out: str | Path | None = None, latency: bool = True,
                    repeats: int = 30, batches=(1, 32), n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                    verify: bool = True) -> tuple[dict, Path]:
    """Evaluate ``bundle`` on ``data`` (``"test"``, ``"router_val"`` or a path); write
    ``report.json``, ``report.md``, ``metric.png`` and ``usage.png`` into ``out``.

    Returns (report dict, output directory).
    """
    from moqe_compile.backends import OrtCpuSession
    from moqe_compile import Runtime

    if repeats < 1:
        raise InputError(f"--repeats {repeats} must be >= 1.")
    if n_boot < 1:
        raise InputError(f"--resamples {n_boot} must be >= 1.")
    with Runtime.load(bundle, verify=verify) as rt:
        root, m = rt.root, rt.manifest
        out_dir = Path(out).resolve() if out else default_out(root)
        if out_dir == root or root in out_dir.parents:
            raise InputError(f"--out {str(out_dir)!r} is inside the bundle; a hashed bundle is never modified. "
                             "Choose a directory outside it.")
        if data in EVAL_SPLITS:
            ed = m.get("report", {}).get("eval_data")
            if not ed:
                raise BundleError(f"bundle {str(root)!r} has no report.eval_data (built before eval data was stored); "
                                  "rebuild it or pass --data PATH.")
            x, y, groups = load_eval_data(root / ed["path"], data)
            source = f"bundle split {data}"
        else:
            x, y, source = load_user_data(data, rt)
            groups = None
        targets = m["build_config"]["_data"]["data"]["targets"]
        note = []
        if targets == "labels" and y is None:
            targets = "fp"
            note.append("the bundle scores experts by cross-entropy, but this data has no labels: L = KL to FP.")
        if data == "router_val":
            note.append("router_val chose the best single expert and the router's epoch: its numbers are optimistic "
                        "for both; only the test split is an unbiased estimate.")
        gate = m.get("router", {}).get("gate")
        if not m["routing"]["enabled"]:
            note.append(f"routing is disabled: the bundle serves {m['routing']['default_expert']} for every input "
                        f"(gate: {gate['reason'] if gate else 'no gate recorded'}). The MoQE rows show the router "
                        "the gate refused, run from the bundle's router file.")
        elif gate and gate.get("forced"):
            note.append(f"routing was forced on with --force-routing: {gate['reason']}")

        t0 = time.perf_counter()
        fp = OrtCpuSession("fp32", root / m["model"]["fp"]["path"])
        fp_logits = _batched(fp.run, x)
        ex_logits = np.stack([_batched(lambda b, n=n: rt.run_expert(n, b), x) for n in rt.expert_names])
        if m["routing"]["enabled"]:
            route = _batched(lambda b: rt.route(b)[0], x)
        else:  # the runtime does not load a refused router; score it anyway, as the build did
            route = _router_route(root, m, x)
        # The deployed path end to end (route + grouped dispatch); must agree with the offline one.
        res = rt.run(x[:256])
        deployed = route if m["routing"]["enabled"] else np.full(len(x), rt.expert_names.index(
            m["routing"]["default_expert"]))
        check_idx = np.arange(len(res.logits))
        runtime_check = {
            "samples": int(len(check_idx)),
            "route_agrees": float((res.expert_index == deployed[check_idx]).mean()),
            "max_abs_logit_diff": float(np.abs(res.logits - ex_logits[deployed[check_idx], check_idx]).max()),
        }
        loss = np.stack([sample_losses(e, fp_logits, y, targets) for e in ex_logits], axis=1)
        copies = None
        ctl = m.get("report", {}).get("controls")
        if ctl and data in EVAL_SPLITS and targets == m["build_config"]["_data"]["data"]["targets"]:
            from moqe_compile.evaluate.controls import Copies

            copies = Copies.load(root / ctl["path"]).for_split(data)
        elif ctl:
            note.append("the copies control was scored on the bundle's own splits only; not available for this data.")
        costs = {e["name"]: e["cost"]["mean_weight_bits"] for e in m["experts"] if "cost" in e}
        rep = build_split_report(fp_logits=fp_logits, expert_logits=ex_logits, expert_names=rt.expert_names,
                                 labels=y, loss=loss, route=route, best_expert=m["routing"]["default_expert"],
                                 targets=targets, split=data if data in EVAL_SPLITS else "user-data", groups=groups,
                                 n_boot=n_boot, seed=seed, strongest=m.get("report", {}).get("strongest_expert"),
                                 expert_costs=costs or None, copies=copies,
                                 expert_val_loss=m.get("report", {}).get("expert_val_loss"))
        score_s = time.perf_counter() - t0
        lat = None
        if latency:
            lat = measure_latency(rt, x, fp, repeats, batches)
        fp.close()

    report = {"bundle": str(root), "data": source, "notes": note, **rep, "gate": gate,
              "routing_enabled": bool(m["routing"]["enabled"]), "runtime_check": runtime_check,
              "latency": lat, "eval_seconds": round(score_s, 2)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report))
    write_plots(rep, out_dir)
    return report, out_dir


def _router_route(root: Path, m: dict, x: np.ndarray) -> np.ndarray:
    from moqe_compile.backends import OrtCpuSession
    from moqe_compile.router.fallback import apply_fallback

    r = m["routing"]
    names = [e["name"] for e in m["experts"]]
    sess = OrtCpuSession("router", root / m["router"]["path"])
    try:
        probs = _batched(sess.run, x)
    finally:
        sess.close()
    return apply_fallback(probs, float(r.get("fallback_threshold", 0.0)),
                          names.index(r.get("fallback_expert", r["default_expert"])))[0]


def measure_latency(rt, x: np.ndarray, fp_session, repeats: int, batches) -> dict:
    from moqe_compile.evaluate.latency import measure_bundle

    return measure_bundle(rt, x, batches, repeats, fp_session=fp_session)


def render_markdown(report: dict) -> str:
    title = f"MoQE evaluation of `{Path(report['bundle']).name}` on {report['data']}"
    md = to_markdown(report, title, report.get("latency"))
    g = report.get("gate")
    if g:
        md += (f"\nBuild-time gate (on {g.get('split', 'router_val')}): **{g['decision']}**"
               f"{' (forced)' if g.get('forced') else ''}: {g['reason']}. Routing is "
               f"{'on' if report.get('routing_enabled') else 'off'} in this bundle.\n")
    if report.get("notes"):
        md += "\n" + "\n".join(f"Note: {n}" for n in report["notes"]) + "\n"
    return md
