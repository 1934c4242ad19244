"""The causal-LM build steps that ``build.py`` runs in :attr:`LMSteps.ORDER`: FP decoder ONNX ->
LM experts -> per-sequence loss matrix -> prefix router -> a bundle with the tokenizer inside
(task kind ``causal-lm``, ``docs/bundle-format.md``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moqe_compile.errors import BuildError
from moqe_compile.tasks.causal_lm.budget import default_expert
from moqe_compile.tasks.causal_lm.config import FLOAT_HEAD, TASK
from moqe_compile.tasks.causal_lm.data import build_text_splits, encoder
from moqe_compile.tasks.causal_lm.report import corpus_choice_on, gate_decision, lm_split_report
from moqe_compile.tasks.causal_lm.score import DecoderSession, LMScores, score_windows

SCORED = ("router_train", "router_val", "test")
REPORTED = ("router_val", "test")
EVAL_DATA = "report/eval_data.npz"
CONTROLS_FILE = "report/controls.npz"
MAIN_BACKEND = "onnxruntime-cpu"


def calib_feeds(ids: np.ndarray, spec) -> list[dict]:
    """Decoder feeds for calibration windows: the full window, an empty past."""
    from moqe_compile.tasks.causal_lm.model import past_names

    empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)
    return [{"input_ids": row[None].copy(), "attention_mask": np.ones((1, len(row)), np.int64),
             **{n: empty for n in past_names(spec.layers)}} for row in ids]


class LMSteps:
    ORDER = ("export", "data", "quantize", "target", "controls", "score", "router", "report")

    def __init__(self, cfg, writer, work: Path, stages):
        import torch

        self.cfg, self.w, self.work, self.st = cfg, writer, work, stages
        self.copies: dict | None = None
        self.budget: dict | None = None
        self.budget_recipe = None  # the budget's chosen expert recipe (target stage)
        self.prefix_tokens, self.prefix_study = cfg.router.prefix_tokens, None
        if not cfg.target.enabled:  # no budget: no target stage, and the manifest's stage times stay as before
            self.ORDER = tuple(n for n in self.ORDER if n != "target")
        torch.manual_seed(cfg.router.seed)

    def extra_versions(self) -> dict:
        return {"transformers": __import__("transformers").__version__}

    def export(self) -> None:
        from moqe_compile.tasks.causal_lm.model import embedding_table, export_decoder, load_causal_lm, save_tokenizer
        from moqe_compile.tasks.causal_lm.moe import find_moe, gate_nodes

        cfg, w = self.cfg, self.w
        self.model, self.tok = load_causal_lm(cfg.model.source, cfg.model.path)
        self.spec = export_decoder(self.model, w.path("fp/model.onnx"), cfg.model.opset)
        self.moe = find_moe(self.model)  # sparse MoE blocks or None; their gates stay FP in every expert
        self.gates = gate_nodes(w.path("fp/model.onnx"), self.moe)
        self.tok_files = save_tokenizer(self.tok, w.path("tokenizer/tokenizer.json").parent)
        self.emb = embedding_table(self.model)

    def data(self) -> None:
        d = self.cfg.data
        self.splits = build_text_splits(encoder(self.tok), self.tok.eos_token_id, d.corpora, asdict(d.split), d.seq_len,
                                        d.seed, d.max_sequences, d.calibration_sequences)
        self.st.say("windows per split: " + ", ".join(f"{s} {len(v)}" for s, v in self.splits.items()))

    def _calib_ids(self, r) -> np.ndarray:
        cal = self.splits["calibration"]
        if not r.calibration_corpus:
            return cal.ids
        ids = cal.ids[cal.corpus == r.calibration_corpus]
        if not len(ids):
            raise BuildError(f"expert {r.name!r}: no calibration windows of corpus {r.calibration_corpus!r}.")
        return ids

    def _quantize_one(self, r, ids: np.ndarray, dest: Path) -> dict:
        """One expert's graph at ``dest`` from calibration windows ``ids``; its manifest extras."""
        from moqe_compile.quantize.nbits import check_kernels, graph_weight_bits
        from moqe_compile.quantize.nbits_fuse import fuse_siblings_file
        from moqe_compile.tasks.causal_lm.experts import quantize_onnx
        from moqe_compile.tasks.causal_lm.model import export_decoder
        from moqe_compile.tasks.causal_lm.moe_bits import build_moe_expert
        from moqe_compile.tasks.causal_lm.smoothing import rescale_for

        src, extra, tm = self.w.path("fp/model.onnx"), {}, rescale_for(r, self.model, ids)
        if tm is not self.model:
            if r.awq:
                extra["awq_alphas"] = tm._moqe_awq_alphas  # noqa: SLF001
            src = self.work / f"{dest.stem}-scaled.onnx"
            export_decoder(tm, src, self.cfg.model.opset)  # checked: the rescaled model is still the FP function
        feeds = calib_feeds(ids, self.spec)
        if r.moe_bits:  # expert-wise bits
            extra["moe_bits"] = build_moe_expert(self.model, self.moe, r, self.cfg.model, ids, src, dest, feeds,
                                                 self.st.say)
        else:
            quantize_onnx(src, r, dest, feeds, exclude_nodes=self.gates, model=tm, calib_ids=ids,
                          progress=not self.st.quiet)
        del tm
        # q/k/v and gate/up as one kernel each: exact, and faster decoding. Before scoring, so
        # what is scored is what is served.
        extra["fused_matmulnbits"] = fuse_siblings_file(dest)
        check = check_kernels(dest, allow_fp_head=r.head_bits == FLOAT_HEAD, allow_fp=self.gates)
        if not check["ok"]:
            raise BuildError(f"expert {r.name!r} does not run on integer/4-bit kernels after ORT "
                             f"optimization: kernels {check['kernels']}, float-weight MatMuls "
                             f"{check['float_weight_matmuls'][:5]}.")
        if not r.moe_bits:  # the head counts at its own width (moe_bits records its own mean)
            extra["mean_weight_bits"] = graph_weight_bits(dest)["mean_weight_bits"]
        return {**extra, "check": check}

    def quantize(self) -> None:
        import time

        self.experts = []
        with self.st.bar(len(self.cfg.experts), "experts") as pb:
            for r in self.cfg.experts:
                t0 = time.perf_counter()
                rel = f"experts/{r.name}/{MAIN_BACKEND}.onnx"
                extra = self._quantize_one(r, self._calib_ids(r), self.w.path(rel))
                check = extra.pop("check")
                self.experts.append({"name": r.name, "recipe": r.to_dict(), **extra,
                                     "variants": {MAIN_BACKEND: {"path": rel, "kernels": check["kernels"],
                                                                 "check": check}},
                                     "build_seconds": round(time.perf_counter() - t0, 2)})
                pb.update(1)

    def target(self) -> None:
        """Compile to an accuracy budget (``[target] max_drop`` > 0, in percent perplexity): the
        cheapest rung of the weight-only ladder that meets it joins the experts."""
        if self.cfg.target.enabled:
            from moqe_compile.tasks.causal_lm.budget import budget_step

            self.budget = budget_step(self)

    def controls(self) -> None:
        cfg = self.cfg
        base = cfg.copies_base() if cfg.controls.copies else None
        if cfg.controls.copies and not cfg.controls.copies_of and self.budget_recipe is not None \
                and self.budget_recipe.calibrated:
            base = self.budget_recipe  # the baseline the gate compares against (see the image plug-in)
        if cfg.controls.copies and base is None:
            self.st.say("controls: no expert depends on calibration (all RTN/HQQ): no copies control")
        if base is not None:
            from moqe_compile.stages import build_copies, copy_parts

            ids = self._calib_ids(base)
            k = cfg.controls.copies

            def build_one(r, idx: np.ndarray) -> Path:
                dest = self.work / f"{r.name}.onnx"
                self._quantize_one(r, ids[idx], dest)
                return dest

            paths = build_copies(base, len(ids), k, cfg.controls.seed, build_one, self.st, base.name)
            last = copy_parts(len(ids), k, cfg.controls.seed)[-1]
            self.copies = {"of": base.name, "names": [f"copy{i}" for i in range(k)], "paths": paths,
                           "calibration_per_copy": int(len(last))}
        self.model = None  # free it before scoring (nothing quantizes after this step)

    def score(self) -> None:
        names = [e["name"] for e in self.experts]
        dims = (self.spec.layers, self.spec.kv_heads, self.spec.head_dim)
        fp_sess = DecoderSession("fp", self.w.path("fp/model.onnx"), *dims)
        ex_sess = [DecoderSession(e["name"], self.w.path(e["variants"][MAIN_BACKEND]["path"]), *dims)
                   for e in self.experts]
        if self.copies:
            ex_sess += [DecoderSession(c, p, *dims) for c, p in zip(self.copies["names"], self.copies["paths"])]
        self.scores, self.copy_scores = {}, {}
        k = len(names)
        with self.st.bar(sum(len(self.splits[s]) for s in SCORED), "score windows") as pb:
            for s in SCORED:
                # router_train trains routers: the experts' (and copies') losses are all it needs,
                # so no FP pass, KL, agreement or mixture there (NaN in loss_matrix.npz).
                train = s == "router_train"
                both = score_windows(None if train else fp_sess, ex_sess, self.splits[s].ids, pb,
                                     mix_of=0 if train else k, detail_of=k)
                self.scores[s] = LMScores(both.nll, both.loss[:, :k], both.kl[:, :k], both.agree[:, :k], both.mix)
                if self.copies:
                    self.copy_scores[s] = both.columns(slice(k, None))

    def _prefix(self, s: str, length: int | None = None) -> np.ndarray:
        return np.ascontiguousarray(self.splits[s].ids[:, : length or self.prefix_tokens])

    def _train(self, num_experts: int, train_loss: np.ndarray, val_loss: np.ndarray, prefix: int | None = None):
        import torch

        from moqe_compile.tasks.causal_lm.router import NLPRouter, train_router

        rc = self.cfg.router
        tr, va = self._prefix("router_train", prefix), self._prefix("router_val", prefix)
        router = NLPRouter(torch.from_numpy(self.emb), num_experts, layers=rc.layers, heads=rc.heads)
        return train_router(router, tr, np.ones_like(tr), train_loss, va, np.ones_like(va), val_loss,
                                epochs=rc.epochs, batch_size=rc.batch_size, lr=rc.lr, weight_decay=rc.weight_decay,
                                targets=rc.targets, temperature=rc.temperature, seed=rc.seed)

    def router(self) -> None:
        from safetensors.torch import save_file

        from moqe_compile.backends.onnxruntime_cpu import session
        from moqe_compile.tasks.causal_lm.router import export_nlp_router

        w = self.w
        self.trained = self._train_choosing_prefix()
        export_nlp_router(self.trained.model, w.path("router/router.onnx"), opset=max(self.cfg.model.opset, 17))
        # The embedding buffer is the FP model's (in fp/model.onnx): not duplicated here.
        save_file({k: v.contiguous() for k, v in self.trained.model.state_dict().items() if k != "embedding"},
                  str(w.path("router/router.safetensors")))
        rs = session(w.path("router/router.onnx"), name="router")
        self.routes = {}
        for s in REPORTED:
            pre = self._prefix(s)
            self.routes[s] = rs.run(None, {"input_ids": pre, "attention_mask": np.ones_like(pre)})[0].argmax(1)
        if self.copies:
            self._route_copies()

    def _train_choosing_prefix(self):
        """The router on ``prefix_tokens``, or one per ``prefix_choices`` length and the one
        ``choose_prefix`` picks on router_val (test is never looked at)."""
        from moqe_compile.tasks.causal_lm.router import choose_prefix, predict_probs

        tr, va, k = self.scores["router_train"].loss, self.scores["router_val"].loss, len(self.experts)
        if not self.cfg.router.prefix_choices:
            return self._train(k, tr, va)
        trained, routed = {}, {}
        for n in sorted(self.cfg.router.prefix_choices):
            self.st.say(f"router: prefix of {n} tokens")
            trained[n] = self._train(k, tr, va, prefix=n)
            pre = self._prefix("router_val", n)
            route = predict_probs(trained[n].model, pre, np.ones_like(pre)).argmax(1)
            routed[n] = va[np.arange(len(va)), route]
        self.prefix_tokens, self.prefix_study = choose_prefix(routed)
        self.st.say(f"router: prefix of {self.prefix_tokens} tokens chosen on router_val")
        return trained[self.prefix_tokens]

    def _route_copies(self) -> None:
        """The same router, trained on the copies: what routing gains from calibration noise alone."""
        import torch

        cv = self.copy_scores["router_val"].loss
        self.copies["best"] = int(cv.mean(0).argmin())  # chosen on validation, as the best single expert
        self.copies["route"] = {}
        if not self.cfg.controls.copies_router:
            return
        self.st.say("controls: training the same router on the copies")
        torch.manual_seed(self.cfg.router.seed)
        res = self._train(len(self.copies["names"]), self.copy_scores["router_train"].loss, cv)
        res.model.eval()
        with torch.no_grad():
            for s in REPORTED:
                ids_t = torch.from_numpy(self._prefix(s))
                self.copies["route"][s] = res.model(ids_t, torch.ones_like(ids_t)).argmax(1).numpy()

    def _copies_for(self, s: str) -> dict | None:
        c = self.copies
        if not c:
            return None
        return {"of": c["of"], "names": c["names"], "best": c["best"], "loss": self.copy_scores[s].loss,
                "route": c["route"].get(s)}

    def report(self) -> None:
        w, d, names = self.w, self.cfg.data, [e["name"] for e in self.experts]
        va = self.scores["router_val"]
        self.best_k, self.default_rule = default_expert(self.budget, names, va.loss, self.cfg.gate.p_value)
        self.val_loss = {n: float(v) for n, v in zip(names, va.loss.mean(0))}
        self.costs = {e["name"]: float(e.get("moe_bits", {}).get("mean_weight_bits",
                                                                 e.get("mean_weight_bits", e["recipe"]["bits"])))
                      for e in self.experts}
        report = {"task": TASK, "seq_len": d.seq_len, "splits": {},
                  "router_training": {"best_epoch": self.trained.best_epoch, "history": self.trained.history,
                                      **({"prefix_choice": self.prefix_study} if self.prefix_study else {})}}
        corpus_choice = corpus_choice_on(va.loss, self.splits["router_val"].corpus)
        for s in REPORTED:
            sc = self.scores[s]
            report["splits"][s] = lm_split_report(sc.nll, sc.loss, names, self.routes[s], self.best_k,
                                                  self.splits[s].corpus, sc.kl, sc.agree, mix=sc.mix,
                                                  copies=self._copies_for(s), costs=self.costs,
                                                  val_loss=self.val_loss, corpus_choice=corpus_choice)
        self.gate = gate_decision(report["splits"]["router_val"], self.cfg.gate.p_value,
                                  self.cfg.gate.force_routing)
        if self.budget:
            from moqe_compile.tasks.causal_lm.budget import gate_within_budget

            self.gate = gate_within_budget(self, self.gate)
        report["gate"] = self.gate
        for e in self.experts:
            t = report["splits"]["test"]["overall"]["experts"][e["name"]]
            e["metrics"] = {"test": {"perplexity": t["ppl"], "perplexity_ci95": t["ppl_ci95"],
                                     "kl_to_fp": t["kl_to_fp"], "fp_top1_agreement": t["fp_top1_agreement"]}}
        w.path("report/report.json").write_text(json.dumps(report, indent=2))
        self._save_arrays()

    def _save_arrays(self) -> None:
        w, names, c = self.w, [e["name"] for e in self.experts], self.copies
        np.savez(w.path("report/loss_matrix.npz"), expert_names=np.array(names),
                 **{k_: v for s in SCORED for k_, v in self.scores[s].to_npz(s).items()},
                 **{f"{s}_corpus": self.splits[s].corpus for s in SCORED})
        if c:
            # Not shipped as experts: their per-window losses (and the copies router's choices)
            # are what `moqe-compile eval` needs to report the control on the stored splits.
            np.savez(w.path(CONTROLS_FILE), names=np.array(c["names"]), of=np.array(c["of"]),
                     best=np.array(c["best"]), calibration_per_copy=np.array(c["calibration_per_copy"]),
                     **{f"{s}_loss": self.copy_scores[s].loss for s in REPORTED},
                     **{f"{s}_route": v for s, v in c["route"].items()})
        np.savez(w.path(EVAL_DATA), **{f"{s}_ids": self.splits[s].ids for s in REPORTED},
                 **{f"{s}_corpus": self.splits[s].corpus for s in REPORTED},
                 **{f"{s}_route": self.routes[s] for s in REPORTED})

    def manifest(self) -> dict:
        cfg, d, spec, splits, gate, c = self.cfg, self.cfg.data, self.spec, self.splits, self.gate, self.copies
        names, n_pre = [e["name"] for e in self.experts], self.prefix_tokens
        manifest = {
            "task": {"kind": TASK, "seq_len": d.seq_len,
                     "tokenizer": {"path": "tokenizer/tokenizer.json",
                                   "other": [{"path": f"tokenizer/{f}"} for f in self.tok_files
                                             if f != "tokenizer.json"]},
                     "eos_token_id": spec.eos_token_id, "bos_token_id": spec.bos_token_id},
            "model": {"source": cfg.model.source, "origin": cfg.model.path, "fp": {"path": "fp/model.onnx"},
                      **({"moe": self.moe.describe()} if self.moe else {}),
                      "decoder": asdict(spec)},
            "io": {"inputs": ["input_ids", "attention_mask", "past_key_values.<i>.key|value"],
                   "outputs": ["logits", "present.<i>.key|value"],
                   "note": "one graph: scoring feeds an empty past (past_sequence = 0), generation feeds presents back"},
            "splits": {s: {"windows": len(splits[s]), "per_corpus": {k: int((splits[s].corpus == k).sum())
                                                                     for k in sorted(set(splits[s].corpus))}}
                       for s in splits} | {"seed": d.seed, "disjoint_by": "document", "seq_len": d.seq_len},
            "experts": self.experts,
            "router": {"path": "router/router.onnx", "weights": {"path": "router/router.safetensors"},
                       "inputs": ["input_ids", "attention_mask"], "output": "expert_probs",
                       "prefix_tokens": n_pre, "config": cfg.to_dict()["router"], "best_epoch": self.trained.best_epoch,
                       "gate": gate},
            "routing": {"enabled": gate["decision"] == "routed", "granularity": "per-sequence",
                        "default_expert": names[self.best_k], "default_rule": self.default_rule,
                        "routed_on": f"FP embeddings of the first {n_pre} tokens (generation: of the prompt)"},
            "backends": [MAIN_BACKEND],
            "report": {"path": "report/report.json", "loss_matrix": {"path": "report/loss_matrix.npz"},
                       "eval_data": {"path": EVAL_DATA, "splits": list(REPORTED)},
                       "expert_val_loss": self.val_loss, "expert_costs": self.costs,
                       **({"frontier": self.budget["manifest"]} if self.budget else {}),
                       "controls": ({"path": CONTROLS_FILE, "copies": c["names"], "of": c["of"],
                                     "calibration_per_copy": c["calibration_per_copy"],
                                     "copies_router": cfg.controls.copies_router} if c else None)},
        }
        self._share_embedding(manifest)
        return manifest

    def _share_embedding(self, manifest: dict) -> None:
        """The FP embedding table is in every graph (FP model, each expert, the router): store it once."""
        from moqe_compile.bundle.shared_weights import share

        w = self.w
        rels = ["fp/model.onnx", manifest["router"]["path"]]
        rels += [e["variants"][MAIN_BACKEND]["path"] for e in self.experts]
        rec = share({r: w.path(r) for r in rels}, self.emb, "embedding", w.tmp)
        if rec["graphs"]:
            manifest["model"]["shared_initializers"] = {"embedding": rec}
        else:
            w.path(rec["path"]).unlink()
