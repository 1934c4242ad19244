"""ONNX Runtime's spin-wait policies side by side on the paths the product runs: threads that
never spin against threads that spin only during a run.

    python bench/spinning.py bundles/mobilenetv2-demo [--lm bundles/smol-rtn-grouped] --repeats 20 [--json PATH]

``--policies always`` (ONNX Runtime's own default: threads go on spinning after a run) is best
timed alone: its threads slow whatever runs after them, the other policies' candidates too.
Each policy gets its own sessions and runtimes (``$MOQE_ORT_SPINNING`` set while they are made),
and every candidate runs interleaved round by round (``evaluate/latency.py``); medians over
``--repeats`` rounds. Image candidates per policy and batch:

- ``expert`` / ``fp32``: the default expert's and the FP32 model's sessions alone;
- ``run``: ``Runtime.run`` on the bundle as built (gated bundles serve one expert);
- ``routed``: ``Runtime.run`` with routing switched on in memory (router, then the expert);
- ``two-experts``: two different experts' sessions back to back, the case that made
  spinning threads starve the next session;
- ``2-callers``: two Python threads calling ``Runtime.run`` at once, ``--calls`` each; the
  time per call (what a service with concurrent requests sees).

With ``--lm``: ``decode`` (``--decode-tokens`` greedy steps after a 32-token prompt) and
``prefill`` (one 256-token window) on the FP decoder and the LM bundle's first expert.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import numpy as np

from moqe_compile import Runtime
from moqe_compile.backends.onnxruntime_cpu import SPINNING, SPINNING_ENV, session
from moqe_compile.bundle import read_bundle
from moqe_compile.evaluate.latency import tile_batch, time_interleaved
from moqe_compile.tasks.image.data import foolbox_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, served_and_fp_paths, write_json  # noqa: E402
from lm_accuracy_level import decode  # noqa: E402


def with_policy(policy: str, make):
    """``make()`` with ``$MOQE_ORT_SPINNING = policy`` (sessions read it when they are made)."""
    old = os.environ.get(SPINNING_ENV)
    os.environ[SPINNING_ENV] = policy
    try:
        return make()
    finally:
        if old is None:
            del os.environ[SPINNING_ENV]
        else:
            os.environ[SPINNING_ENV] = old


def concurrent_calls(rt: Runtime, x: np.ndarray, calls: int) -> None:
    """Two threads, ``calls`` runs each, at once."""
    ts = [threading.Thread(target=lambda: [rt.run(x) for _ in range(calls)]) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def image_candidates(bundle: str, policies: list[str], calls: int) -> tuple[dict, callable]:
    """Per-policy sessions and runtimes; returns (objects, candidates-for-a-batch)."""
    objs = {}
    for p in policies:
        def make(p=p):
            rt = Runtime.load(bundle)
            expert, paths = served_and_fp_paths(rt)
            b = read_bundle(bundle)
            m = dict(b.manifest, routing=dict(b.manifest["routing"], enabled=True))
            routed = Runtime(b.root, m, rt.backend)
            others = [n for n in rt.expert_names if n != expert]
            e = rt.manifest["experts"][rt.expert_names.index(others[0])] if others else None
            other = session(rt.root / e["variants"]["onnxruntime-cpu"]["path"]) if e else None
            return {"rt": rt, "routed": routed, "expert": session(paths["int8"]), "fp32": session(paths["fp32"]),
                    "other": other}
        objs[p] = with_policy(p, make)

    def cands(x: np.ndarray) -> dict:
        out = {}
        for p, o in objs.items():
            feed = {o["expert"].get_inputs()[0].name: x}
            out[f"{p}/expert"] = lambda s=o["expert"], f=feed: s.run(None, f)
            out[f"{p}/fp32"] = lambda s=o["fp32"], f=feed: s.run(None, f)
            out[f"{p}/run"] = lambda r=o["rt"]: r.run(x)
            out[f"{p}/routed"] = lambda r=o["routed"]: r.run(x)
            if o["other"] is not None:
                out[f"{p}/two-experts"] = lambda a=o["expert"], b=o["other"], f=feed: (a.run(None, f), b.run(None, f))
            out[f"{p}/2-callers"] = lambda r=o["rt"]: concurrent_calls(r, x, calls)
        return out

    return objs, cands


def lm_candidates(bundle: str, policies: list[str], decode_tokens: int) -> dict:
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    out = {}
    for p in policies:
        rt = with_policy(p, lambda: LMRuntime.load(bundle))
        names = ["fp", rt.expert_names[0]]
        sessions = {n: with_policy(p, lambda n=n: rt.session(n)) for n in names}
        ids = np.asarray(rt.encode("The history of the Roman Empire " * 64), np.int64)
        prompt, window = ids[:32], ids[None, :256]
        for n, s in sessions.items():
            out[f"{p}/lm-decode/{n}"] = lambda s=s: decode(s, prompt, decode_tokens)
            out[f"{p}/lm-prefill/{n}"] = lambda s=s: s.logits(window)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="an image bundle")
    ap.add_argument("--lm", default=None, help="also a causal-lm bundle")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--policies", nargs="+", default=["never", "in-run"], choices=SPINNING)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calls", type=int, default=8, help="runs per thread in the 2-callers candidate")
    ap.add_argument("--decode-tokens", type=int, default=16)
    add_json_option(ap)
    args = ap.parse_args()

    objs, cands = image_candidates(args.bundle, args.policies, args.calls)
    _, pool = objs[args.policies[0]]["rt"].load_inputs(foolbox_dir())
    res = {"bundle": Path(args.bundle).name, "lm_bundle": Path(args.lm).name if args.lm else None,
           "policies": args.policies, "repeats": args.repeats, "calls": args.calls, "batches": {}}
    for bs in args.batches:
        row = time_interleaved(cands(tile_batch(pool, bs)), args.repeats)
        for k in row:
            if k.endswith("/2-callers"):  # per call
                row[k] = {**row[k], "per_call_ms": round(row[k]["median_ms"] / (2 * args.calls), 3)}
        res["batches"][str(bs)] = row
        report(f"batch {bs}", row, args.policies)
    if args.lm:
        row = time_interleaved(lm_candidates(args.lm, args.policies, args.decode_tokens), max(3, args.repeats // 3))
        res["lm"] = row
        report(f"language model ({args.decode_tokens} decode tokens; 256-token prefill)", row, args.policies)
    write_json(args.json, res)


def report(title: str, row: dict, policies: list[str]) -> None:
    print(title + ":")
    base = policies[0]
    for what in sorted({k.split("/", 1)[1] for k in row}):
        cells = []
        for p in policies:
            r = row.get(f"{p}/{what}")
            if r is None:
                continue
            ms = r.get("per_call_ms", r["median_ms"])
            ref = row[f"{base}/{what}"]
            ratio = ref.get("per_call_ms", ref["median_ms"]) / ms
            cells.append(f"{p} {ms:9.3f} ms (x{ratio:.2f})")
        print(f"  {what:<24} " + "   ".join(cells))


if __name__ == "__main__":
    main()
