"""``build``: model -> export -> quantize -> score -> route -> bundle, each stage in order.

Everything is written inside a :class:`BundleWriter`, so a failure at any stage (or
Ctrl-C) leaves no partial bundle behind.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moqe_compile import __version__
from moqe_compile.backends import OrtCpuSession
from moqe_compile.bundle import BundleWriter
from moqe_compile.tasks.image.config import BuildConfig
from moqe_compile.errors import ConfigError
from moqe_compile.tasks.image.data import SPLITS, build_splits, calibration_inputs, num_sources
from moqe_compile.tasks.image.preprocess import Preprocess
from moqe_compile.tasks.image.model import load_fp_model
from moqe_compile.tasks.image.model import write_labels
from moqe_compile.quantize import prepare_for_quantization
from moqe_compile.tasks.image.experts import build_expert
from moqe_compile.tasks.image.router_export import export_router
from moqe_compile.router.fallback import apply_fallback, choose_fallback
from moqe_compile.router.train import kl_to_fp_matrix, train_router
from moqe_compile.evaluate.controls import CONTROLS_FILE, build_copies, expert_cost, strongest_expert
from moqe_compile.tasks.image.eval import EVAL_SPLITS, save_eval_data
from moqe_compile.evaluate.report import flat_metrics
from moqe_compile.tasks.image.report import build_split_report, gate_decision
from moqe_compile.tasks.image.score import diversity, run_batched, score


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"moqe_compile": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


def log(msg: str) -> None:
    print(f"[moqe-compile] {msg}", file=sys.stderr, flush=True)


def build(cfg: BuildConfig, out: str | Path, quiet: bool = False) -> Path:
    rc = cfg.router
    if rc.downsample == "subsample" and cfg.preprocessing.crop % rc.input_size:
        # torch's and ONNX Resize's "nearest" pick different pixels for a non-integer factor,
        # so the exported router would fail its check against torch after the whole build.
        raise ConfigError(f"[router] downsample = 'subsample' needs crop = {cfg.preprocessing.crop} to be a multiple "
                          f"of input_size = {rc.input_size}; choose input_size from "
                          f"{[d for d in range(4, cfg.preprocessing.crop + 1, 4) if cfg.preprocessing.crop % d == 0]} "
                          "or downsample = 'avgpool'.")
    t_start = time.perf_counter()
    stage_s: dict[str, float] = {}
    pre = Preprocess.from_dict(asdict(cfg.preprocessing))
    bar = lambda total, desc: tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False)  # noqa: E731

    def stage(name: str):
        stage_s[name] = time.perf_counter()
        if not quiet:
            log(name)

    def done(name: str):
        stage_s[name] = round(time.perf_counter() - stage_s[name], 2)

    with BundleWriter(out) as w, tempfile.TemporaryDirectory(prefix="moqe-work-") as work:
        work = Path(work)
        stage("export")
        fp = load_fp_model(cfg.model, cfg.preprocessing, w.path("fp/model.onnx"))
        write_labels(fp.labels, w.path("task/labels.json"))
        done("export")

        stage("data")
        n_src = num_sources(cfg.data)
        with bar(n_src, "images") as pb:
            splits = build_splits(cfg.data, pre, pb)
        done("data")

        stage("quantize")
        prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
        experts = []
        # Experts are scored on the ORT CPU graph when there is one (the embedded runtime).
        backend = "onnxruntime-cpu" if "onnxruntime-cpu" in cfg.backends.targets else cfg.backends.targets[0]
        sensitivity = None
        if any(r.exclude_sensitive for r in cfg.experts):
            from moqe_compile.quantize.sensitivity import layer_sensitivity

            sensitivity = layer_sensitivity(prepared, fp.input_name, splits["calibration"].x, work)
        with bar(len(cfg.experts), "experts") as pb:
            for r in cfg.experts:
                rels = {b: f"experts/{r.name}/{b}.onnx" for b in cfg.backends.targets}
                exclude = [s["node"] for s in sensitivity[: r.exclude_sensitive]] if sensitivity else []
                calib = calibration_inputs(splits["calibration"], r.calibration_domain)  # one domain, or all
                built = build_expert(prepared, fp.input_name, calib, r, cfg.backends.targets,
                                     {b: w.path(rel) for b, rel in rels.items()},
                                     w.path(f"experts/{r.name}/calibration.json"), work, exclude)
                variants = {}
                for b, info in built["variants"].items():
                    if "kernels" in info["check"]:
                        info["kernels"] = info["check"]["kernels"]
                    variants[b] = {"path": rels[b], **info}
                experts.append({"name": r.name, "recipe": asdict(r), "variants": variants, "steps": built["steps"],
                                "calibration_ranges": {"path": f"experts/{r.name}/calibration.json"},
                                "cost": {"mean_weight_bits": expert_cost(prepared, exclude + list(r.exclude_nodes),
                                                                         r.weight_bits, r.high_precision_nodes)}})
                pb.update(1)
        done("quantize")

        stage("score")
        fp_sess = OrtCpuSession("fp", fp.path)
        ex_sess = [OrtCpuSession(e["name"], w.path(e["variants"][backend]["path"])) for e in experts]
        scores = {}
        with bar(len(SPLITS[1:]) * (1 + len(experts)), "score") as pb:
            for s in SPLITS[1:]:
                d = splits[s]
                scores[s] = score(fp_sess, ex_sess, d.x, d.labels, cfg.data.targets, pb)
        done("score")

        copies = None
        if cfg.controls.copies:
            stage("controls")
            copies = build_copies(cfg, prepared, fp.input_name, splits, {s: scores[s].fp_logits for s in SPLITS[1:]},
                                  work, SPLITS[1:], log=(lambda m: None) if quiet else log)
            copies.save(w.path(CONTROLS_FILE))
            done("controls")

        stage("router")
        tr, va, rc = scores["router_train"], scores["router_val"], cfg.router
        # fp-teacher targets come from the per-sample KL-to-FP matrix; with [data] targets = "fp"
        # that is the loss matrix itself, with labels it is computed from the scored logits.
        teacher = (kl_to_fp_matrix(tr.fp_logits, tr.expert_logits)
                   if rc.targets == "fp-teacher" and cfg.data.targets != "fp" else None)
        # Cost-aware routing: every expert's loss is charged cost_weight per extra weight bit,
        # for training, epoch choice and fallback alike (the report shows the true losses).
        cost_vec = np.array([e["cost"]["mean_weight_bits"] for e in experts])
        pen = rc.cost_weight * (cost_vec - cost_vec.min())
        tr_loss, va_loss = tr.loss + pen, va.loss + pen
        with bar(rc.epochs, "router epochs") as pb:
            res = train_router(rc, splits["router_train"].x, tr_loss, splits["router_val"].x, va_loss, pb,
                               target_matrix=None if teacher is None else teacher + pen)
        export_router(res.core, rc.input_size, cfg.preprocessing.crop, w.path("router/router.onnx"),
                      w.path("router/router.safetensors"), channels=cfg.preprocessing.channels,
                      mode=rc.downsample, quantize=rc.quantize, calib_x=splits["router_train"].x)
        # From here on, route exactly as the Runtime does: the exported graph + the confidence
        # fallback, whose threshold is chosen on router_val (never on test).
        router_sess = OrtCpuSession("router", w.path("router/router.onnx"), 1)
        fallback = (choose_fallback(run_batched(router_sess, splits["router_val"].x), va_loss) if rc.fallback
                    else {"threshold": 0.0, "expert": int(va_loss.mean(0).argmin())})
        route_of = lambda x: apply_fallback(run_batched(router_sess, x), fallback["threshold"],  # noqa: E731
                                            fallback["expert"])[0]
        done("router")

        stage("report")
        names = [e["name"] for e in experts]
        # The best single expert is chosen on validation, never on test.
        best_k = int(va.loss.mean(0).argmin())
        strongest = strongest_expert(cfg.experts)
        costs = {e["name"]: e["cost"]["mean_weight_bits"] for e in experts}
        val_loss = {n: float(v) for n, v in zip(names, va.loss.mean(0))}
        report = {"targets": cfg.data.targets, "splits": {}}
        for s in EVAL_SPLITS:  # router_val, test: bootstrap CIs and MoQE-vs-best tests (evaluate/report.py)
            sc, d = scores[s], splits[s]
            route = route_of(d.x)  # the deployed router (exported graph + fallback)
            report["splits"][s] = build_split_report(
                fp_logits=sc.fp_logits, expert_logits=sc.expert_logits, expert_names=names, labels=d.labels,
                loss=sc.loss, route=route, best_expert=best_k, targets=cfg.data.targets, split=s, groups=d.sources,
                strongest=strongest, expert_costs=costs, expert_val_loss=val_loss,
                copies=copies.for_split(s) if copies else None)
            report["splits"][s]["diversity"] = diversity(sc.expert_logits, names, sc.fp_logits, d.labels)
        gate = gate_decision(report["splits"]["router_val"], cfg.gate.p_value, cfg.gate.force_routing)
        report["gate"] = gate
        if not quiet:
            log(f"gate: {gate['decision']} ({gate['reason']})")
        for e in experts:
            e["metrics"] = {"test": flat_metrics(report["splits"]["test"]["experts"][e["name"]], len(splits["test"].x))}
        eval_storage = save_eval_data(w.path("report/eval_data.npz"), {s: splits[s] for s in EVAL_SPLITS},
                                      cfg.preprocessing.mean, cfg.preprocessing.std)
        report["router_training"] = {"best_epoch": res.best_epoch, "history": res.history}
        np.savez(w.path("report/loss_matrix.npz"), expert_names=np.array(names),
                 **{f"{s}_loss": scores[s].loss for s in scores},
                 **{f"{s}_labels": splits[s].labels for s in scores if splits[s].labels is not None})
        import json

        w.path("report/report.json").write_text(json.dumps(report, indent=2))
        done("report")
        stage_s["total"] = round(time.perf_counter() - t_start, 2)

        manifest = {
            "created_with": _versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_config": cfg.to_manifest(),
            "task": {"kind": "image-classification", "num_classes": fp.num_classes,
                     "labels": {"path": "task/labels.json"}},
            "model": {"source": cfg.model.source, "arch": cfg.model.arch,
                      "origin": cfg.model.path if cfg.model.source == "onnx" else cfg.model.weights,
                      "fp": {"path": "fp/model.onnx"}},
            "preprocessing": {**asdict(cfg.preprocessing), "layout": "NCHW", "dtype": "float32",
                              "color": pre.mode, "interpolation": "bilinear"},
            "io": {"input": {"name": fp.input_name, "shape": ["batch", *pre.input_shape], "dtype": "float32"},
                   "output": {"name": fp.output_name, "shape": ["batch", fp.num_classes], "dtype": "float32"}},
            "splits": {s: {"source_images": len(set(splits[s].sources)), "samples": int(len(splits[s].x)),
                           "augmentations_per_image": cfg.data.augmentations} for s in SPLITS}
                      | {"seed": cfg.data.seed, "disjoint_by": "source image"},
            "experts": experts,
            "sensitivity": sensitivity,
            "router": {"path": "router/router.onnx", "weights": {"path": "router/router.safetensors"},
                       "input": "input", "output": "expert_probs", "config": asdict(cfg.router),
                       "best_epoch": res.best_epoch, "gate": gate},
            "routing": {"enabled": gate["decision"] == "routed", "granularity": "per-input",
                        "default_expert": names[best_k],
                        "fallback_threshold": fallback["threshold"], "fallback_expert": names[fallback["expert"]],
                        "fallback_chosen_on": {k: v for k, v in fallback.items() if k.startswith("val_")}},
            "backends": list(cfg.backends.targets),
            "report": {"path": "report/report.json", "loss_matrix": {"path": "report/loss_matrix.npz"},
                       "eval_data": {"path": "report/eval_data.npz", "splits": list(EVAL_SPLITS),
                                     "storage": eval_storage},
                       "strongest_expert": strongest,
                       "expert_val_loss": val_loss,  # cost-matched controls pick brackets by it
                       "controls": ({"path": CONTROLS_FILE, "copies": copies.names, "preset": copies.preset,
                                     "calibration_per_copy": copies.calibration_per_copy,
                                     "copies_router": cfg.controls.copies_router} if copies else None),
                       "build_seconds": stage_s},
        }
        return w.commit(manifest)
