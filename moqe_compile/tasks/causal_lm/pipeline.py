"""``build`` for causal language models: model -> FP decoder ONNX -> LM experts -> per-sequence
loss matrix -> NLP router -> bundle with the tokenizer inside (docs/bundle-format.md, task
kind ``causal-lm``). Everything is written inside a :class:`BundleWriter`: a failure leaves
no partial bundle.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moqe_compile.bundle import BundleWriter
from moqe_compile.tasks.causal_lm.data import build_text_splits
from moqe_compile.tasks.causal_lm.report import lm_split_report
from moqe_compile.tasks.causal_lm.config import TASK, LMBuildConfig
from moqe_compile.tasks.causal_lm.score import DecoderSession, LMScores, score_windows

SCORED = ("router_train", "router_val", "test")
EVAL_DATA = "report/eval_data.npz"
CONTROLS_FILE = "report/controls.npz"


def log(msg: str) -> None:
    print(f"[moqe-compile] {msg}", file=sys.stderr, flush=True)


def calib_feeds(ids: np.ndarray, spec) -> list[dict]:
    from moqe_compile.tasks.causal_lm.model import past_names

    empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)
    return [{"input_ids": row[None].copy(), "attention_mask": np.ones((1, len(row)), np.int64),
             **{n: empty for n in past_names(spec.layers)}} for row in ids]


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


def build_lm(cfg: LMBuildConfig, out: str | Path, quiet: bool = False) -> Path:
    import torch

    from moqe_compile.tasks.causal_lm.model import embedding_table, export_decoder, load_causal_lm, save_tokenizer
    from moqe_compile.tasks.causal_lm.moe import find_moe, gate_nodes
    from moqe_compile.tasks.causal_lm.moe_bits import build_moe_expert
    from moqe_compile.tasks.image.pipeline import _versions
    from moqe_compile.quantize.nbits import check_kernels
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx
    from moqe_compile.tasks.causal_lm.smoothing import awq, smoothquant
    from moqe_compile.tasks.causal_lm.router import NLPRouter, export_nlp_router, train_nlp_router

    t_start = time.perf_counter()
    secs: dict[str, float] = {}
    say = (lambda m: None) if quiet else log  # noqa: E731
    bar = lambda total, desc: tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False)  # noqa: E731

    def stage(name):
        secs[name] = time.perf_counter()
        say(name)

    def done(name):
        secs[name] = round(time.perf_counter() - secs[name], 2)

    torch.manual_seed(cfg.router.seed)
    with BundleWriter(out) as w, tempfile.TemporaryDirectory(prefix="moqe-lm-work-") as work:
        work = Path(work)
        stage("export")
        model, tok = load_causal_lm(cfg.model.source, cfg.model.path)
        spec = export_decoder(model, w.path("fp/model.onnx"), cfg.model.opset)
        moe = find_moe(model)  # sparse MoE blocks or None (models/moe.py); their gates stay FP in every expert
        gates = gate_nodes(w.path("fp/model.onnx"), moe)
        tok_files = save_tokenizer(tok, w.path("tokenizer/tokenizer.json").parent)
        emb = embedding_table(model)
        done("export")

        stage("data")
        d = cfg.data
        encode = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
        splits = build_text_splits(encode, tok.eos_token_id, d.corpora, asdict(d.split), d.seq_len, d.seed,
                                   d.max_sequences, d.calibration_sequences)
        say("windows per split: " + ", ".join(f"{s} {len(v)}" for s, v in splits.items()))
        done("data")

        stage("quantize")
        cal = splits["calibration"]

        def calib_ids(r) -> np.ndarray:
            if not r.calibration_corpus:
                return cal.ids
            ids = cal.ids[cal.corpus == r.calibration_corpus]
            if not len(ids):
                from moqe_compile.errors import BuildError

                raise BuildError(f"expert {r.name!r}: no calibration windows of corpus {r.calibration_corpus!r}.")
            return ids

        def quantize_one(r, ids: np.ndarray, dest: Path) -> dict:
            """One expert's graph at ``dest`` from calibration windows ``ids``; its manifest extras."""
            src, extra = w.path("fp/model.onnx"), {}
            if r.smoothquant_alpha or r.awq:
                if r.smoothquant_alpha:
                    tm = smoothquant(model, ids, r.smoothquant_alpha)
                else:
                    tm = awq(model, ids, r.bits, r.block_size, r.symmetric, r.awq_grid)
                    extra["awq_alphas"] = tm._moqe_awq_alphas  # noqa: SLF001
                src = work / f"{dest.stem}-scaled.onnx"
                export_decoder(tm, src, cfg.model.opset)  # checked: the rescaled model is still the FP function
                del tm
            if r.moe_bits:  # expert-wise bits (quantize/moe_bits.py)
                extra["moe_bits"] = build_moe_expert(model, moe, r, cfg.model, ids, src, dest,
                                                     calib_feeds(ids, spec), say)
            else:
                quantize_onnx(src, r, dest, calib_feeds(ids, spec), exclude_nodes=gates)
            check = check_kernels(dest, allow_fp_head=not r.quantize_lm_head, allow_fp=gates)
            if not check["ok"]:
                from moqe_compile.errors import BuildError

                raise BuildError(f"expert {r.name!r} does not run on integer/4-bit kernels after ORT "
                                 f"optimization: kernels {check['kernels']}, float-weight MatMuls "
                                 f"{check['float_weight_matmuls'][:5]}.")
            return {**extra, "check": check}

        experts = []
        with bar(len(cfg.experts), "experts") as pb:
            for r in cfg.experts:
                t0 = time.perf_counter()
                rel = f"experts/{r.name}/onnxruntime-cpu.onnx"
                extra = quantize_one(r, calib_ids(r), w.path(rel))
                check = extra.pop("check")
                experts.append({"name": r.name, "recipe": asdict(r), **extra,
                                "variants": {"onnxruntime-cpu": {"path": rel, "kernels": check["kernels"],
                                                                 "check": check}},
                                "build_seconds": round(time.perf_counter() - t0, 2)})
                pb.update(1)
        done("quantize")

        copies = None
        base = cfg.copies_base() if cfg.controls.copies else None
        if cfg.controls.copies and base is None:
            say("controls: no expert depends on calibration (all RTN/HQQ): no copies control")
        if base is not None:
            stage("controls")
            ids = calib_ids(base)
            k = cfg.controls.copies
            if len(ids) < k:
                from moqe_compile.errors import BuildError

                raise BuildError(f"[controls] copies = {k} needs at least {k} calibration windows of {base.name!r}; "
                                 f"there are {len(ids)}: raise [data] calibration_sequences.")
            parts = np.array_split(np.random.default_rng(cfg.controls.seed).permutation(len(ids)), k)
            copies = {"of": base.name, "names": [f"copy{i}" for i in range(k)], "paths": [],
                      "calibration_per_copy": int(len(parts[-1]))}
            with bar(k, f"copies of {base.name}") as pb:
                for i, part in enumerate(parts):
                    dest = work / f"copy{i}.onnx"
                    quantize_one(replace(base, name=f"copy{i}"), ids[np.sort(part)], dest)
                    copies["paths"].append(dest)
                    pb.update(1)
            done("controls")
        model = None  # free it before scoring (the nested quantize_one no longer runs)

        stage("score")
        names = [e["name"] for e in experts]
        dims = (spec.layers, spec.kv_heads, spec.head_dim)
        fp_sess = DecoderSession("fp", w.path("fp/model.onnx"), *dims)
        ex_sess = [DecoderSession(e["name"], w.path(e["variants"]["onnxruntime-cpu"]["path"]), *dims) for e in experts]
        if copies:
            ex_sess += [DecoderSession(c, pth, *dims) for c, pth in zip(copies["names"], copies["paths"])]
        scores, copy_scores = {}, {}
        k = len(names)
        with bar(sum(len(splits[s]) for s in SCORED), "score windows") as pb:
            for s in SCORED:
                both = score_windows(fp_sess, ex_sess, splits[s].ids, pb, mix_of=k)
                scores[s] = LMScores(both.nll, both.loss[:, :k], both.kl[:, :k], both.agree[:, :k], both.mix)
                if copies:
                    copy_scores[s] = both.columns(slice(k, None))
        del fp_sess, ex_sess
        done("score")

        stage("router")
        rc, n_pre = cfg.router, cfg.router.prefix_tokens
        pre = lambda s: np.ascontiguousarray(splits[s].ids[:, :n_pre])  # noqa: E731
        ones = lambda a: np.ones_like(a)  # noqa: E731
        router = NLPRouter(torch.from_numpy(emb), len(names), layers=rc.layers, heads=rc.heads)
        res = train_nlp_router(router, pre("router_train"), ones(pre("router_train")), scores["router_train"].loss,
                               pre("router_val"), ones(pre("router_val")), scores["router_val"].loss,
                               epochs=rc.epochs, batch_size=rc.batch_size, lr=rc.lr, weight_decay=rc.weight_decay,
                               targets=rc.targets, temperature=rc.temperature, seed=rc.seed)
        export_nlp_router(res.router, w.path("router/router.onnx"), opset=max(cfg.model.opset, 17))
        from safetensors.torch import save_file

        # The embedding buffer is the FP model's (in fp/model.onnx): not duplicated here.
        save_file({k: v.contiguous() for k, v in res.router.state_dict().items() if k != "embedding"},
                  str(w.path("router/router.safetensors")))
        import onnxruntime as ort

        rs = ort.InferenceSession(str(w.path("router/router.onnx")), providers=["CPUExecutionProvider"])
        routes = {s: rs.run(None, {"input_ids": pre(s), "attention_mask": ones(pre(s))})[0].argmax(1)
                  for s in ("router_val", "test")}
        if copies:
            cv = copy_scores["router_val"].loss
            copies["best"] = int(cv.mean(0).argmin())  # chosen on validation, as the best single expert
            copies["route"] = {}
            if cfg.controls.copies_router:
                say("controls: training the same router on the copies")
                torch.manual_seed(rc.seed)
                kc = len(copies["names"])
                cres = train_nlp_router(NLPRouter(torch.from_numpy(emb), kc, layers=rc.layers, heads=rc.heads),
                                        pre("router_train"), ones(pre("router_train")),
                                        copy_scores["router_train"].loss, pre("router_val"), ones(pre("router_val")),
                                        cv, epochs=rc.epochs, batch_size=rc.batch_size, lr=rc.lr,
                                        weight_decay=rc.weight_decay, targets=rc.targets,
                                        temperature=rc.temperature, seed=rc.seed)
                cres.router.eval()
                with torch.no_grad():
                    for s in ("router_val", "test"):
                        ids_t = torch.from_numpy(pre(s))
                        copies["route"][s] = cres.router(ids_t, torch.ones_like(ids_t)).argmax(1).numpy()
        done("router")

        stage("report")
        va = scores["router_val"]
        best_k = int(va.loss.mean(0).argmin())  # best single expert: chosen on validation
        val_loss = {n: float(v) for n, v in zip(names, va.loss.mean(0))}
        costs = {e["name"]: float(e.get("moe_bits", {}).get("mean_weight_bits", e["recipe"]["bits"])) for e in experts}

        def copies_for(s: str) -> dict | None:
            if not copies:
                return None
            return {"of": copies["of"], "names": copies["names"], "best": copies["best"],
                    "loss": copy_scores[s].loss, "route": copies["route"].get(s)}

        report = {"task": TASK, "seq_len": d.seq_len, "splits": {},
                  "router_training": {"best_epoch": res.best_epoch, "history": res.history}}
        for s in ("router_val", "test"):
            sc = scores[s]
            report["splits"][s] = lm_split_report(sc.nll, sc.loss, names, routes[s], best_k, splits[s].corpus,
                                                  sc.kl, sc.agree, mix=sc.mix, copies=copies_for(s), costs=costs,
                                                  val_loss=val_loss)
        gate = gate_decision(report["splits"]["router_val"]["overall"], cfg.gate.p_value, cfg.gate.force_routing)
        report["gate"] = gate
        say(f"gate: {gate['decision']} ({gate['reason']})")
        for j, e in enumerate(experts):
            t = report["splits"]["test"]["overall"]["experts"][e["name"]]
            e["metrics"] = {"test": {"perplexity": t["ppl"], "perplexity_ci95": t["ppl_ci95"],
                                     "kl_to_fp": t["kl_to_fp"], "fp_top1_agreement": t["fp_top1_agreement"]}}
        w.path("report/report.json").write_text(json.dumps(report, indent=2))
        np.savez(w.path("report/loss_matrix.npz"), expert_names=np.array(names),
                 **{k_: v for s in SCORED for k_, v in scores[s].to_npz(s).items()},
                 **{f"{s}_corpus": splits[s].corpus for s in SCORED})
        if copies:
            # Not shipped as experts: their per-window losses (and the copies router's choices)
            # are what `moqe-compile eval` needs to report the control on the stored splits.
            np.savez(w.path(CONTROLS_FILE), names=np.array(copies["names"]), of=np.array(copies["of"]),
                     best=np.array(copies["best"]), calibration_per_copy=np.array(copies["calibration_per_copy"]),
                     **{f"{s}_loss": copy_scores[s].loss for s in ("router_val", "test")},
                     **{f"{s}_route": v for s, v in copies["route"].items()})
        np.savez(w.path(EVAL_DATA), **{f"{s}_ids": splits[s].ids for s in ("router_val", "test")},
                 **{f"{s}_corpus": splits[s].corpus for s in ("router_val", "test")},
                 **{f"{s}_route": routes[s] for s in ("router_val", "test")})
        done("report")
        secs["total"] = round(time.perf_counter() - t_start, 2)

        manifest = {
            "created_with": {**_versions(), "transformers": __import__("transformers").__version__},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_config": cfg.to_manifest(),
            "task": {"kind": TASK, "seq_len": d.seq_len,
                     "tokenizer": {"path": "tokenizer/tokenizer.json",
                                   "other": [{"path": f"tokenizer/{f}"} for f in tok_files if f != "tokenizer.json"]},
                     "eos_token_id": spec.eos_token_id, "bos_token_id": spec.bos_token_id},
            "model": {"source": cfg.model.source, "origin": cfg.model.path, "fp": {"path": "fp/model.onnx"},
                      **({"moe": moe.describe()} if moe else {}),
                      "decoder": asdict(spec)},
            "io": {"inputs": ["input_ids", "attention_mask", "past_key_values.<i>.key|value"],
                   "outputs": ["logits", "present.<i>.key|value"],
                   "note": "one graph: scoring feeds an empty past (past_sequence = 0), generation feeds presents back"},
            "splits": {s: {"windows": len(splits[s]), "per_corpus": {c: int((splits[s].corpus == c).sum())
                                                                     for c in sorted(set(splits[s].corpus))}}
                       for s in splits} | {"seed": d.seed, "disjoint_by": "document", "seq_len": d.seq_len},
            "experts": experts,
            "router": {"path": "router/router.onnx", "weights": {"path": "router/router.safetensors"},
                       "inputs": ["input_ids", "attention_mask"], "output": "expert_probs",
                       "prefix_tokens": n_pre, "config": asdict(rc), "best_epoch": res.best_epoch, "gate": gate},
            "routing": {"enabled": gate["decision"] == "routed", "granularity": "per-sequence",
                        "default_expert": names[best_k],
                        "routed_on": f"FP embeddings of the first {n_pre} tokens (generation: of the prompt)"},
            "backends": ["onnxruntime-cpu"],
            "report": {"path": "report/report.json", "loss_matrix": {"path": "report/loss_matrix.npz"},
                       "eval_data": {"path": EVAL_DATA, "splits": ["router_val", "test"]},
                       "expert_val_loss": val_loss, "expert_costs": costs,
                       "controls": ({"path": CONTROLS_FILE, "copies": copies["names"], "of": copies["of"],
                                     "calibration_per_copy": copies["calibration_per_copy"],
                                     "copies_router": cfg.controls.copies_router} if copies else None),
                       "build_seconds": secs},
        }
        # The FP embedding table is in every graph (FP model, each expert, the router): store it once.
        from moqe_compile.bundle.shared_weights import share

        graphs = {"fp/model.onnx": w.path("fp/model.onnx"), manifest["router"]["path"]: w.path(manifest["router"]["path"])}
        graphs |= {e["variants"]["onnxruntime-cpu"]["path"]: w.path(e["variants"]["onnxruntime-cpu"]["path"])
                   for e in experts}
        rec = share(graphs, emb, "embedding", w.tmp)
        if rec["graphs"]:
            manifest["model"]["shared_initializers"] = {"embedding": rec}
        else:
            w.path(rec["path"]).unlink()
        return w.commit(manifest)
