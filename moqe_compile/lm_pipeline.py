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
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .bundle import BundleWriter
from .data.text import build_text_splits
from .evaluate.lm import lm_split_report
from .evaluate.stats import paired_bootstrap
from .lm_config import TASK, LMBuildConfig
from .score_lm import DecoderSession, score_windows

SCORED = ("router_train", "router_val", "test")
EVAL_DATA = "report/eval_data.npz"


def log(msg: str) -> None:
    print(f"[moqe-compile] {msg}", file=sys.stderr, flush=True)


def calib_feeds(ids: np.ndarray, spec) -> list[dict]:
    from .models.lm import past_names

    empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)
    return [{"input_ids": row[None].copy(), "attention_mask": np.ones((1, len(row)), np.int64),
             **{n: empty for n in past_names(spec.layers)}} for row in ids]


def gate_decision(val_routed: np.ndarray, val_best: np.ndarray, p_value: float, force: bool) -> dict:
    t = paired_bootstrap(val_routed, val_best)
    wins = t["diff"] < 0 and t["p_value"] < p_value
    reason = (f"router_val MoQE − best single = {t['diff']:+.4f} nats/token, p = {t['p_value']:.3g} "
              f"({'significant gain' if wins else 'no significant gain'} at p < {p_value})")
    decision = "routed" if wins or force else "single-expert"
    return {"decision": decision, "forced": bool(force and not wins), "reason": reason, "test": t}


def build_lm(cfg: LMBuildConfig, out: str | Path, quiet: bool = False) -> Path:
    import torch

    from .models.lm import embedding_table, export_decoder, load_causal_lm, save_tokenizer
    from .pipeline import _versions
    from .quantize.lm import awq, check_kernels, quantize_onnx, smoothquant
    from .router.nlp import NLPRouter, export_nlp_router, train_nlp_router

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
        feeds = calib_feeds(splits["calibration"].ids, spec)
        experts = []
        with bar(len(cfg.experts), "experts") as pb:
            for r in cfg.experts:
                t0 = time.perf_counter()
                src, extra = w.path("fp/model.onnx"), {}
                if r.smoothquant_alpha or r.awq:
                    calib = splits["calibration"].ids
                    if r.smoothquant_alpha:
                        tm = smoothquant(model, calib, r.smoothquant_alpha)
                    else:
                        tm = awq(model, calib, r.bits, r.block_size, r.symmetric, r.awq_grid)
                        extra["awq_alphas"] = tm._moqe_awq_alphas  # noqa: SLF001
                    src = work / f"{r.name}-scaled.onnx"
                    export_decoder(tm, src, cfg.model.opset)  # checked: the rescaled model is still the FP function
                    del tm
                rel = f"experts/{r.name}/onnxruntime-cpu.onnx"
                quantize_onnx(src, r, w.path(rel), feeds)
                check = check_kernels(w.path(rel), allow_fp_head=not r.quantize_lm_head)
                if not check["ok"]:
                    from .errors import BuildError

                    raise BuildError(f"expert {r.name!r} does not run on integer/4-bit kernels after ORT "
                                     f"optimization: kernels {check['kernels']}, float-weight MatMuls "
                                     f"{check['float_weight_matmuls'][:5]}.")
                experts.append({"name": r.name, "recipe": asdict(r), **extra,
                                "variants": {"onnxruntime-cpu": {"path": rel, "kernels": check["kernels"],
                                                                 "check": check}},
                                "build_seconds": round(time.perf_counter() - t0, 2)})
                pb.update(1)
        del model
        done("quantize")

        stage("score")
        names = [e["name"] for e in experts]
        dims = (spec.layers, spec.kv_heads, spec.head_dim)
        fp_sess = DecoderSession("fp", w.path("fp/model.onnx"), *dims)
        ex_sess = [DecoderSession(e["name"], w.path(e["variants"]["onnxruntime-cpu"]["path"]), *dims) for e in experts]
        scores = {}
        with bar(sum(len(splits[s]) for s in SCORED), "score windows") as pb:
            for s in SCORED:
                scores[s] = score_windows(fp_sess, ex_sess, splits[s].ids, pb)
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
        done("router")

        stage("report")
        va = scores["router_val"]
        best_k = int(va.loss.mean(0).argmin())  # best single expert: chosen on validation
        gate = gate_decision(va.loss[np.arange(len(va.loss)), routes["router_val"]], va.loss[:, best_k],
                             cfg.gate.p_value, cfg.gate.force_routing)
        say(f"gate: {gate['decision']} ({gate['reason']})")
        report = {"task": TASK, "seq_len": d.seq_len, "gate": gate, "splits": {},
                  "router_training": {"best_epoch": res.best_epoch, "history": res.history}}
        for s in ("router_val", "test"):
            sc = scores[s]
            report["splits"][s] = lm_split_report(sc.nll, sc.loss, names, routes[s], best_k, splits[s].corpus,
                                                  sc.kl, sc.agree)
        for j, e in enumerate(experts):
            t = report["splits"]["test"]["overall"]["experts"][e["name"]]
            e["metrics"] = {"test": {"perplexity": t["ppl"], "perplexity_ci95": t["ppl_ci95"],
                                     "kl_to_fp": t["kl_to_fp"], "fp_top1_agreement": t["fp_top1_agreement"]}}
        w.path("report/report.json").write_text(json.dumps(report, indent=2))
        np.savez(w.path("report/loss_matrix.npz"), expert_names=np.array(names),
                 **{k: v for s in SCORED for k, v in scores[s].to_npz(s).items()},
                 **{f"{s}_corpus": splits[s].corpus for s in SCORED})
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
                       "build_seconds": secs},
        }
        return w.commit(manifest)
