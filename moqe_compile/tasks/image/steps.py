"""The image-classification build steps that ``build.py`` runs in :attr:`ImageSteps.ORDER`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moqe_compile.backends import OrtCpuSession
from moqe_compile.evaluate.controls import CONTROLS_FILE, Copies
from moqe_compile.evaluate.losses import kl_to_fp, sample_losses
from moqe_compile.evaluate.report import flat_metrics
from moqe_compile.quantize import prepare_for_quantization
from moqe_compile.router.fallback import apply_fallback, choose_fallback
from moqe_compile.tasks.image.data import SPLITS, build_splits, calibration_inputs, num_sources
from moqe_compile.tasks.image.eval import EVAL_SPLITS, save_eval_data
from moqe_compile.tasks.image.experts import build_expert, copy_recipe, expert_cost, strongest_expert
from moqe_compile.tasks.image.model import load_fp_model, write_labels
from moqe_compile.tasks.image.preprocess import Preprocess
from moqe_compile.tasks.image.report import build_split_report, gate_decision
from moqe_compile.tasks.image.router import kl_to_fp_matrix, predict_probs, small_inputs, train_router
from moqe_compile.tasks.image.router_export import export_router
from moqe_compile.tasks.image.budget import default_expert
from moqe_compile.tasks.image.score import diversity, run_batched, score

SCORED = SPLITS[1:]  # every split but calibration


class ImageSteps:
    ORDER = ("export", "data", "quantize", "score", "target", "controls", "router", "report")

    def __init__(self, cfg, writer, work: Path, stages):
        self.cfg, self.w, self.work, self.st = cfg, writer, work, stages
        self.pre = Preprocess.from_dict(asdict(cfg.preprocessing))
        # Experts are scored on the ORT CPU graph when there is one (the embedded runtime).
        targets = cfg.backends.targets
        self.backend = "onnxruntime-cpu" if "onnxruntime-cpu" in targets else targets[0]
        self.copies: Copies | None = None
        self.budget: dict | None = None
        self.budget_recipe = None  # the budget's chosen expert recipe (target stage)
        if not cfg.target.enabled:  # no budget: no target stage, and the manifest's stage times stay as before
            self.ORDER = tuple(n for n in self.ORDER if n != "target")

    def extra_versions(self) -> dict:
        return {}

    def export(self) -> None:
        self.fp = load_fp_model(self.cfg.model, self.cfg.preprocessing, self.w.path("fp/model.onnx"))
        write_labels(self.fp.labels, self.w.path("task/labels.json"))

    def data(self) -> None:
        with self.st.bar(num_sources(self.cfg.data), "images") as pb:
            self.splits = build_splits(self.cfg.data, self.pre, pb)

    def quantize(self) -> None:
        cfg = self.cfg
        self.prepared = prepare_for_quantization(self.fp.path, self.work / "prepared.onnx")
        self.sensitivity = None
        if any(r.exclude_sensitive for r in cfg.experts):
            from moqe_compile.quantize.sensitivity import layer_sensitivity

            self.sensitivity = layer_sensitivity(self.prepared, self.fp.input_name, self.splits["calibration"].x,
                                                 self.work, kl_to_fp, show_progress=not self.st.quiet)
        self.experts = []
        with self.st.bar(len(cfg.experts), "experts") as pb:
            for r in cfg.experts:
                self.experts.append(self._expert(r))
                pb.update(1)

    def _expert(self, r) -> dict:
        cfg, w = self.cfg, self.w
        rels = {b: f"experts/{r.name}/{b}.onnx" for b in cfg.backends.targets}
        exclude = [s["node"] for s in self.sensitivity[: r.exclude_sensitive]] if self.sensitivity else []
        calib = calibration_inputs(self.splits["calibration"], r.calibration_domain)  # one domain, or all
        built = build_expert(self.prepared, self.fp.input_name, calib, r, cfg.backends.targets,
                             {b: w.path(rel) for b, rel in rels.items()},
                             w.path(f"experts/{r.name}/calibration.json"), self.work, exclude,
                             progress=not self.st.quiet)
        variants = {}
        for b, info in built["variants"].items():
            if "kernels" in info["check"]:
                info["kernels"] = info["check"]["kernels"]
            variants[b] = {"path": rels[b], **info}
        bits = expert_cost(self.prepared, exclude + list(r.exclude_nodes), r.weight_bits, r.high_precision_nodes,
                           r.high_precision_ends)
        return {"name": r.name, "recipe": r.to_dict(), "variants": variants, "steps": built["steps"],
                "calibration_ranges": {"path": f"experts/{r.name}/calibration.json"},
                "cost": {"mean_weight_bits": bits}}

    def score(self) -> None:
        fp_sess = OrtCpuSession("fp", self.fp.path)
        ex_sess = [OrtCpuSession(e["name"], self.w.path(e["variants"][self.backend]["path"])) for e in self.experts]
        self.scores = {}
        with self.st.bar(len(SCORED) * (1 + len(self.experts)), "score") as pb:
            for s in SCORED:
                d = self.splits[s]
                self.scores[s] = score(fp_sess, ex_sess, d.x, d.labels, self.cfg.data.targets, pb)

    def target(self) -> None:
        """Compile to an accuracy budget (``[target] max_drop`` > 0): the cheapest candidate that
        meets it joins the experts and is served unless routing does better within the budget."""
        if self.cfg.target.enabled:
            from moqe_compile.tasks.image.budget import budget_step

            self.budget = budget_step(self)

    def controls(self) -> None:
        if not self.cfg.controls.copies:
            return
        from moqe_compile.stages import build_copies, copy_parts

        cfg = self.cfg
        # Copies measure the calibration noise of the baseline the gate compares against: in a
        # budget build that is the budget's expert, unless copies_of names another.
        base = copy_recipe(cfg) if cfg.controls.copies_of or self.budget_recipe is None else self.budget_recipe
        # Label: the expert copied (its recipe may override its preset, e.g. 2-bit weights).
        label = base.preset if base.name == "copy" else base.name
        calib = self.splits["calibration"].x

        def build_one(r, idx: np.ndarray) -> OrtCpuSession:
            out = self.work / f"{r.name}.onnx"
            build_expert(self.prepared, self.fp.input_name, calib[idx], r, ["onnxruntime-cpu"],
                         {"onnxruntime-cpu": out}, self.work / f"{r.name}.json", self.work,
                         progress=not self.st.quiet)
            return OrtCpuSession(r.name, out)

        k = cfg.controls.copies
        sessions = build_copies(base, len(calib), k, cfg.controls.seed, build_one, self.st, label)
        splits = {s: self._score_copies(sessions, s) for s in SCORED}
        best = int(splits["router_val"]["loss"].mean(0).argmin())
        if cfg.controls.copies_router:
            self._route_copies(splits, best)
        for sess in sessions:
            sess.close()
        splits.pop("router_train", None)  # used for training only; not reported
        first = copy_parts(len(calib), k, cfg.controls.seed)[0]  # the largest part, as recorded before
        self.copies = Copies([s.name for s in sessions], label, best, int(len(first)),
                             splits)
        self.copies.save(self.w.path(CONTROLS_FILE))

    def _score_copies(self, sessions: list, s: str) -> dict:
        d, fp_logits = self.splits[s], self.scores[s].fp_logits
        logits = [run_batched(sess, d.x) for sess in sessions]
        return {"loss": np.stack([sample_losses(l, fp_logits, d.labels, self.cfg.data.targets) for l in logits], 1),
                "pred": np.stack([l.argmax(-1) for l in logits], axis=1).astype(np.int64), "route": None}

    def _route_copies(self, splits: dict, best: int) -> None:
        """The same router, trained on the copies: what routing gains from calibration noise alone."""
        rc = self.cfg.router
        self.st.say("controls: training the same router on the copies")
        res = train_router(rc, self.splits["router_train"].x, splits["router_train"]["loss"],
                           self.splits["router_val"].x, splits["router_val"]["loss"])
        probs = {s: predict_probs(res.model, small_inputs(self.splits[s].x, rc.input_size, rc.downsample))
                 for s in splits if s != "router_train"}
        fb = (choose_fallback(probs["router_val"], splits["router_val"]["loss"]) if rc.fallback
              else {"threshold": 0.0, "expert": best})
        for s, p in probs.items():
            splits[s]["route"] = apply_fallback(p, fb["threshold"], fb["expert"])[0].astype(np.int64)

    def router(self) -> None:
        cfg, rc, w = self.cfg, self.cfg.router, self.w
        tr, va = self.scores["router_train"], self.scores["router_val"]
        # fp-teacher targets come from the per-sample KL-to-FP matrix; with [data] targets = "fp"
        # that is the loss matrix itself, with labels it is computed from the scored logits.
        teacher = (kl_to_fp_matrix(tr.fp_logits, tr.expert_logits)
                   if rc.targets == "fp-teacher" and cfg.data.targets != "fp" else None)
        # Cost-aware routing: every expert's loss is charged cost_weight per extra weight bit,
        # for training, epoch choice and fallback alike (the report shows the true losses).
        cost_vec = np.array([e["cost"]["mean_weight_bits"] for e in self.experts])
        pen = rc.cost_weight * (cost_vec - cost_vec.min())
        tr_loss, va_loss = tr.loss + pen, va.loss + pen
        with self.st.bar(rc.epochs, "router epochs") as pb:
            self.trained = train_router(rc, self.splits["router_train"].x, tr_loss, self.splits["router_val"].x,
                                        va_loss, pb, target_matrix=None if teacher is None else teacher + pen)
        export_router(self.trained.model, rc.input_size, cfg.preprocessing.crop, w.path("router/router.onnx"),
                      w.path("router/router.safetensors"), channels=cfg.preprocessing.channels,
                      mode=rc.downsample, quantize=rc.quantize, calib_x=self.splits["router_train"].x)
        # From here on, route exactly as the Runtime does: the exported graph + the confidence
        # fallback, whose threshold is chosen on router_val (never on test).
        self.router_sess = OrtCpuSession("router", w.path("router/router.onnx"), 1)
        self.fallback = (choose_fallback(run_batched(self.router_sess, self.splits["router_val"].x), va_loss)
                         if rc.fallback else {"threshold": 0.0, "expert": int(va_loss.mean(0).argmin())})

    def route(self, x: np.ndarray) -> np.ndarray:
        """The deployed routing: the exported router graph and the confidence fallback."""
        probs = run_batched(self.router_sess, x)
        return apply_fallback(probs, self.fallback["threshold"], self.fallback["expert"])[0]

    def report(self) -> None:
        cfg, w = self.cfg, self.w
        names = [e["name"] for e in self.experts]
        va = self.scores["router_val"]
        self.strongest = strongest_expert(cfg.experts)
        # The single expert served without routing: the budget's choice, else the strongest
        # preset unless another expert is significantly better on validation.
        self.best_k, self.default_rule = default_expert(self.budget, names, va.loss, self.strongest,
                                                        cfg.gate.p_value, self.splits["router_val"].sources)
        costs = {e["name"]: e["cost"]["mean_weight_bits"] for e in self.experts}
        self.val_loss = {n: float(v) for n, v in zip(names, va.loss.mean(0))}
        report = {"targets": cfg.data.targets, "splits": {}}
        for s in EVAL_SPLITS:  # router_val, test: bootstrap CIs and MoQE-vs-best tests
            sc, d = self.scores[s], self.splits[s]
            report["splits"][s] = build_split_report(
                fp_logits=sc.fp_logits, expert_logits=sc.expert_logits, expert_names=names, labels=d.labels,
                loss=sc.loss, route=self.route(d.x), best_expert=self.best_k, targets=cfg.data.targets, split=s,
                groups=d.sources, strongest=self.strongest, expert_costs=costs, expert_val_loss=self.val_loss,
                copies=self.copies.for_split(s) if self.copies else None)
            report["splits"][s]["diversity"] = diversity(sc.expert_logits, names, sc.fp_logits, d.labels)
        self.gate = gate_decision(report["splits"]["router_val"], cfg.gate.p_value, cfg.gate.force_routing)
        if self.budget:
            from moqe_compile.tasks.image.budget import gate_within_budget

            self.gate = gate_within_budget(self, self.gate)
        report["gate"] = self.gate
        for e in self.experts:
            e["metrics"] = {"test": flat_metrics(report["splits"]["test"]["experts"][e["name"]],
                                                 len(self.splits["test"].x))}
        self.eval_storage = save_eval_data(w.path("report/eval_data.npz"), {s: self.splits[s] for s in EVAL_SPLITS},
                                           cfg.preprocessing.mean, cfg.preprocessing.std)
        report["router_training"] = {"best_epoch": self.trained.best_epoch, "history": self.trained.history}
        np.savez(w.path("report/loss_matrix.npz"), expert_names=np.array(names),
                 **{f"{s}_loss": self.scores[s].loss for s in self.scores},
                 **{f"{s}_labels": self.splits[s].labels for s in self.scores if self.splits[s].labels is not None})
        w.path("report/report.json").write_text(json.dumps(report, indent=2))

    def manifest(self) -> dict:
        cfg, fp, pre, splits, gate = self.cfg, self.fp, self.pre, self.splits, self.gate
        names = [e["name"] for e in self.experts]
        copies = self.copies
        return {
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
            "experts": self.experts,
            "sensitivity": self.sensitivity,
            "router": {"path": "router/router.onnx", "weights": {"path": "router/router.safetensors"},
                       "input": "input", "output": "expert_probs", "config": asdict(cfg.router),
                       "best_epoch": self.trained.best_epoch, "gate": gate},
            "routing": {"enabled": gate["decision"] == "routed", "granularity": "per-input",
                        "default_expert": names[self.best_k], "default_rule": self.default_rule,
                        "fallback_threshold": self.fallback["threshold"],
                        "fallback_expert": names[self.fallback["expert"]],
                        "fallback_chosen_on": {k: v for k, v in self.fallback.items() if k.startswith("val_")}},
            "backends": list(cfg.backends.targets),
            "report": {"path": "report/report.json", "loss_matrix": {"path": "report/loss_matrix.npz"},
                       "eval_data": {"path": "report/eval_data.npz", "splits": list(EVAL_SPLITS),
                                     "storage": self.eval_storage},
                       "strongest_expert": self.strongest,
                       **({"frontier": self.budget["manifest"]} if self.budget else {}),
                       "expert_val_loss": self.val_loss,  # cost-matched controls pick brackets by it
                       "controls": ({"path": CONTROLS_FILE, "copies": copies.names, "preset": copies.preset,
                                     "calibration_per_copy": copies.calibration_per_copy,
                                     "copies_router": cfg.controls.copies_router} if copies else None)},
        }
