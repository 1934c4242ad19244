"""``moqe-compile eval`` for ``causal-lm`` bundles: perplexity of FP, each expert, the oracle and
MoQE with bootstrap intervals and the paired MoQE-vs-best test, plus per-sequence latency.

``--data``: ``test`` / ``router_val`` (the bundle's stored windows), ``wiki`` / ``c4`` / ``tiny``
(the stored test windows of that corpus when it was in the build; otherwise the corpus is split
by document with the build's seed and fractions and its test documents are used), or a UTF-8
text file (all of its windows: it was never seen by the build, unless you gave it).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moqe_compile.bundle import read_bundle
from moqe_compile.evaluate.report import prepare_out
from moqe_compile.errors import InputError
from moqe_compile.tasks.causal_lm.report import lm_split_report, render_lm_markdown


def _windows(bundle, data: str, encode, eos) -> tuple[np.ndarray, np.ndarray, str, tuple | None]:
    """(ids, corpus, description, (stored split, row index) or None when not the build's windows)."""
    from moqe_compile.tasks.causal_lm.data import BUILTIN, build_text_splits, documents, read_corpus, windows
    from moqe_compile.tasks.causal_lm.config import LMBuildConfig

    m = bundle.manifest
    seq_len = m["task"]["seq_len"]
    with np.load(bundle.file(m["report"]["eval_data"]["path"]), allow_pickle=False) as z:
        stored = {k: z[k] for k in z.files}
    if data in ("test", "router_val"):
        return (stored[f"{data}_ids"], stored[f"{data}_corpus"], f"stored {data} split",
                (data, np.arange(len(stored[f"{data}_ids"]))))
    if data in BUILTIN:
        keep = stored["test_corpus"] == data
        if keep.any():
            return (stored["test_ids"][keep], stored["test_corpus"][keep], f"stored test split, corpus {data}",
                    ("test", np.flatnonzero(keep)))
        cfg = LMBuildConfig.from_manifest(m["build_config"])
        d = cfg.data
        s = build_text_splits(encode, eos, [data], asdict(d.split), seq_len, d.seed, d.max_sequences,
                              d.calibration_sequences)["test"]
        return s.ids, s.corpus, f"corpus {data}: test documents (split with the build's seed {d.seed})", None
    p = Path(data)
    if not p.is_file():
        raise InputError(f"--data {data!r} is not test, router_val, one of {list(BUILTIN)} or a text file.")
    ids = windows(encode, eos, documents(read_corpus(str(p))), seq_len)
    if not len(ids):
        raise InputError(f"--data {data!r} holds fewer than {seq_len} tokens (the bundle's window length).")
    return ids, np.array([p.stem] * len(ids)), f"file {p} (all windows)", None


def _copies(bundle, where: tuple | None) -> dict | None:
    """The copies control's stored per-window losses for the build's own windows (copies are not
    shipped, so other text cannot be scored by them)."""
    rec = bundle.manifest["report"].get("controls")
    if not rec or where is None:
        return None
    split, rows = where
    with np.load(bundle.file(rec["path"]), allow_pickle=False) as z:
        return {"of": str(z["of"]), "names": [str(n) for n in z["names"]], "best": int(z["best"]),
                "loss": z[f"{split}_loss"][rows],
                "route": z[f"{split}_route"][rows] if f"{split}_route" in z.files else None}


def evaluate_lm(bundle_dir: str, data: str = "test", with_latency: bool = True, repeats: int = 5, n_boot: int = 10_000,
                seed: int = 0, verify: bool = True, progress: bool = True) -> dict:
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime
    from moqe_compile.tasks.causal_lm.score import score_windows

    rt = LMRuntime(read_bundle(bundle_dir, verify=verify))

    def encode(text: str) -> list[int]:
        return rt.tokenizer.encode(text, add_special_tokens=False).ids

    ids, corpus, desc, where = _windows(rt.bundle, data, encode, rt.eos)
    names = rt.expert_names
    with tqdm(total=len(ids), desc="score windows", disable=not progress, leave=False) as pb:
        sc = score_windows(rt.session("fp"), [rt.session(n) for n in names], ids, pb)
    routing_was = rt.routing_enabled
    rt.routing_enabled = True  # MoQE = the router's choice, whatever the gate serves (reported below)
    route, _ = rt.route(list(ids))
    rt.routing_enabled = routing_was
    best = names.index(rt.manifest["routing"]["default_expert"])
    r = rt.manifest["report"]
    rep = lm_split_report(sc.nll, sc.loss, names, route, best, corpus, sc.kl, sc.agree, n_boot, seed, mix=sc.mix,
                          copies=_copies(rt.bundle, where), costs=r.get("expert_costs"),
                          val_loss=r.get("expert_val_loss"))
    rep.update(data=desc, served="router" if routing_was else f"single expert {names[best]} (gate)",
               gate=rt.manifest["router"]["gate"]["reason"])
    if with_latency:
        rep["latency_ms"] = latency(rt, ids[0], repeats)
    rt.close()
    return rep


def latency(rt, window: np.ndarray, repeats: int) -> dict:
    """Median ms per sequence (one window of the bundle's length), candidates interleaved per round."""
    x = window[None]
    rt.routing_enabled, was = True, rt.routing_enabled
    cands = {"router": lambda: rt.route([window]), "fp": lambda: rt.session("fp").logits(x)}
    for n in rt.expert_names:
        cands[n] = (lambda s: (lambda: s.logits(x)))(rt.session(n))
    cands["moqe"] = lambda: rt.session(rt.expert_names[int(rt.route([window])[0][0])]).logits(x)
    times: dict[str, list[float]] = {k: [] for k in cands}
    for f in cands.values():
        f()  # warm-up
    for _ in range(max(1, repeats)):
        for k, f in cands.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    rt.routing_enabled = was
    med = {k: float(np.median(v)) for k, v in times.items()}
    routed = rt.expert_names[int(rt.route([window])[0][0])]
    return {"median_ms": med, "repeats": repeats, "tokens": int(len(window)),
            "moqe_over_its_expert": med["moqe"] / med[routed], "expert_of_timed_window": routed}


def cmd_eval(args) -> int:
    """``moqe-compile eval`` on a causal-LM bundle (arguments: :mod:`moqe_compile.cli.eval`)."""
    b = Path(args.bundle).resolve()
    out = prepare_out(b, args.out)  # before the evaluation: a bad --out fails at once
    rep = evaluate_lm(args.bundle, data=args.data, with_latency=args.latency, repeats=args.repeats,
                      n_boot=args.resamples, seed=args.seed, verify=not args.no_verify)
    md = render_lm_markdown(rep, f"{b.name}: {rep['data']} (served: {rep['served']})")
    if "latency_ms" in rep:
        lat = rep["latency_ms"]
        md += (f"\n\nLatency per {lat['tokens']}-token sequence, ONNX Runtime CPU, median of {lat['repeats']} "
               "interleaved rounds (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in lat["median_ms"].items())
               + f"; MoQE / its expert {lat['moqe_over_its_expert']:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(rep, indent=2)), ("report.md", md + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)  # atomic
    print(json.dumps(rep, indent=2) if args.json else md)
    if not args.json:
        print(f"report written to {out}/ (report.json, report.md)")
    return 0
