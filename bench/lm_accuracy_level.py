"""4-bit weight-only LM experts (MatMulNBits) at three ``accuracy_level`` settings against the FP
decoder: prefill and decode speed, perplexity, side by side. ``a0``: float compute everywhere;
``a0+8bit-a4``: float compute on the 4-bit nodes and int8 compute on the 8-bit ones (the head),
the build's default (``accuracy_level = 0``, ``accuracy_level_8bit = 4``); ``a4``: int8 compute
everywhere.

    python bench/lm_accuracy_level.py bundles/smollm2-135m --windows 4 --decode-tokens 16 --repeats 3 [--json PATH]

For every MatMulNBits expert of an LM bundle, one session per setting is made from its verified
graph with the attribute rewritten on every MatMulNBits node (in memory; the bundle is not
touched), next to the FP decoder. Per round, interleaved: a prefill of one test window
(``seq_len`` tokens) and a decode of ``--decode-tokens`` single-token steps on the KV cache
after a 32-token prompt (``--prompt-tokens``; ``steps``: the single-token steps alone).
Perplexity: mean token NLL over the first ``--windows`` test
windows of the bundle's ``report/eval_data.npz``, with a paired bootstrap over windows of
each setting minus ``a0`` (test split, chose nothing here).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


SETTINGS = {"a0": (0, 0), "a0+8bit-a4": (0, 4), "a4": (4, 4)}  # (level, level on the 8-bit nodes)


def with_level(graph, level: int, level_8bit: int):
    """The bundle graph with ``accuracy_level`` rewritten on every MatMulNBits node (in memory)."""
    import onnx

    from moqe_compile.quantize.nbits import apply_accuracy_level

    m = onnx.load_from_string(graph.model)
    apply_accuracy_level(m, level, level_8bit)
    return dataclasses.replace(graph, model=m.SerializeToString())


def decode(sess, prompt: np.ndarray, steps: int, cached=None) -> None:
    """The prompt's pass, then ``steps`` greedy single-token steps on the KV cache; ``cached``:
    (logits, past) of the prompt's pass, computed before, so that only the steps run."""
    ids = prompt[None].astype(np.int64)
    logits, past = cached if cached is not None else sess.step(ids, np.ones_like(ids), sess.empty_past(1))
    mask_len = ids.shape[1]
    for _ in range(steps):
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
        mask_len += 1
        logits, past = sess.step(nxt, np.ones((1, mask_len), np.int64), past)


def add_measure_options(ap: argparse.ArgumentParser, repeats: int) -> None:
    """``--windows``, ``--decode-tokens``, ``--repeats``, ``--prompt-tokens`` (what :func:`measure`
    takes) and ``--threads`` (the ONNX Runtime sessions' intra-op threads, :func:`opener`)."""
    ap.add_argument("--windows", type=int, default=4, help="test windows scored for perplexity")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=repeats, help="interleaved timing rounds")
    ap.add_argument("--prompt-tokens", type=int, default=32,
                    help="decode after this many test tokens (beyond one window: the next windows')")
    ap.add_argument("--threads", type=int, default=0)


def parse_measure_args(doc: str, repeats: int, extra=None) -> argparse.Namespace:
    """The LM benches' command line: a bundle, ``extra(parser)``'s own options, the options of
    :func:`add_measure_options` and ``--json``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("bundle")
    if extra is not None:
        extra(ap)
    add_measure_options(ap, repeats=repeats)
    add_json_option(ap)
    return ap.parse_args()


def timing_row(nll: dict, med: dict, k: str, fp: str, phases=("prefill", "decode", "steps")) -> dict:
    """Perplexity of session ``k`` and, per phase, its median time and speed-up over session ``fp``."""
    row = {"ppl": float(np.exp(nll[k].mean()))}
    for ph in phases:
        row[f"{ph}_ms"] = med[f"{ph}/{k}"]
        row[f"{ph}_speedup_vs_fp"] = med[f"{ph}/{fp}"] / med[f"{ph}/{k}"]
    return row


def opener(bundle, threads: int = 0):
    """``open(name, graph or path)``: a DecoderSession of the bundle's decoder layout."""
    from moqe_compile.tasks.causal_lm.score import DecoderSession

    d = bundle.manifest["model"]["decoder"]
    return lambda name, graph: DecoderSession(name, graph, d["layers"], d["kv_heads"], d["head_dim"], threads)


def measure_and_head(bundle, sessions: dict, args) -> tuple:
    """:func:`measure` with the options of :func:`add_measure_options`; returns (windows, nll,
    medians, the JSON's common head), the run described in one printed line."""
    windows, nll, med = measure(bundle, sessions, args.windows, args.decode_tokens, args.repeats, args.prompt_tokens)
    print(f"{len(windows)} test windows of {windows.shape[1]} tokens; prefill = one window, decode = the pass over "
          f"a {args.prompt_tokens}-token prompt and {args.decode_tokens} tokens, steps = those tokens alone; "
          f"medians of {args.repeats} interleaved rounds")
    head = {"bundle": str(args.bundle), "windows": int(len(windows)), "tokens_per_window": int(windows.shape[1]),
            "decode_tokens": args.decode_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
            "median_ms": med, "models": {}}
    return windows, nll, med, head


def nbits_graphs(bundle, names=None) -> dict:
    """{"fp": the FP decoder graph, name: graph} for the bundle's MatMulNBits experts (all, or ``names``)."""
    m = bundle.manifest
    graphs = {"fp": bundle.graph(m["model"]["fp"]["path"])}
    for e in m["experts"]:
        if e["recipe"].get("scheme") == "nbits" and (names is None or e["name"] in names):
            graphs[e["name"]] = bundle.graph(e["variants"]["onnxruntime-cpu"]["path"])
    return graphs


def measure(bundle, sessions: dict, n_windows: int, decode_tokens: int, repeats: int, prompt_tokens: int = 32):
    """The bundle's first ``n_windows`` test windows; per session the mean token NLL of each
    window, and the medians (ms) of ``repeats`` interleaved rounds of ``prefill/<session>`` (the
    first window), ``decode/<session>`` (the pass over a prompt of the first ``prompt_tokens``
    test tokens, then ``decode_tokens`` greedy tokens) and ``steps/<session>`` (those tokens
    alone, on the prompt's KV cache computed before)."""
    from moqe_compile.tasks.causal_lm.score import token_nll

    with np.load(bundle.file("report/eval_data.npz"), allow_pickle=False) as z:
        windows = z["test_ids"][:n_windows]
    # a prompt longer than a window runs on into the next ones (decoding at a long context)
    window, prompt = windows[0], np.concatenate(list(windows))[:prompt_tokens]
    if len(prompt) < prompt_tokens:
        raise SystemExit(f"--prompt-tokens {prompt_tokens}: the {len(windows)} windows hold {len(prompt)} tokens; "
                         f"raise --windows.")
    nll = {k: np.array([token_nll(s.logits(w[None]), w[None].astype(np.int64)).mean() for w in windows])
           for k, s in sessions.items()}
    cands = {}
    for k, s in sessions.items():
        cands[f"prefill/{k}"] = (lambda s=s: s.logits(window[None]))
        cands[f"decode/{k}"] = (lambda s=s: decode(s, prompt, decode_tokens))
        ids = prompt[None].astype(np.int64)
        logits, past = s.step(ids, np.ones_like(ids), s.empty_past(1))
        cached = (logits[:, -1:].copy(), past)  # the last position is all a step reads
        cands[f"steps/{k}"] = (lambda s=s, c=cached: decode(s, prompt, decode_tokens, c))
    for f in cands.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(repeats):
        for k, f in cands.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return windows, nll, {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    args = parse_measure_args(__doc__, repeats=3)

    from moqe_compile.bundle import read_bundle
    from moqe_compile.evaluate.stats import bootstrap_ci, paired_bootstrap

    b = read_bundle(args.bundle)
    open_ = opener(b, args.threads)
    graphs = nbits_graphs(b)
    sessions = {"fp": open_("fp", graphs.pop("fp"))}
    for name, g in graphs.items():
        for tag, levels in SETTINGS.items():
            sessions[f"{name}/{tag}"] = open_(f"{name}/{tag}", with_level(g, *levels))
    _, nll, med, out = measure_and_head(b, sessions, args)
    for k in sessions:
        row = timing_row(nll, med, k, "fp") | {"nll_ci95": list(bootstrap_ci(nll[k]))}
        extra = ""
        if "/" in k and not k.endswith("/a0"):
            p = row["nll_minus_a0"] = paired_bootstrap(nll[k], nll[k.rsplit("/", 1)[0] + "/a0"])
            extra = f"  NLL - a0 {p['diff']:+.4f} {np.round(p['ci95'], 4)}"
        out["models"][k] = row
        print(f"  {k:<26} ppl {row['ppl']:8.3f}  prefill {row['prefill_ms']:8.1f} ms (x{row['prefill_speedup_vs_fp']:.2f} "
              f"vs FP)  decode {row['decode_ms']:8.1f} ms (x{row['decode_speedup_vs_fp']:.2f} vs FP)  steps "
              f"{row['steps_ms']:8.1f} ms (x{row['steps_speedup_vs_fp']:.2f}){extra}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
