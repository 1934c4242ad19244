"""What routing among LM experts costs at run time: resident memory and prefill/decode latency of
a routed causal-LM bundle against serving its best single expert.

    python bench/lm_domain_cost.py bundles/smollm2-domains-large --windows 8 --decode-tokens 16 --repeats 3 [--json PATH]

Memory: one child process per case, each opening the bundle and creating the sessions it would
hold (RSS from /proc after one window through each): ``MoQE`` keeps every expert and the router
resident (a routed service meets every kind of text), ``single`` the best single expert on
router_val only. The FP embedding table is stored once in the bundle and mapped once
(bundle/shared_weights.py), so the difference is the experts' own weights and sessions.

Latency, interleaved per round over the first ``--windows`` test windows (the same for both):
``prefill``: the router on the window's prefix and the routed expert over the whole window
(``seq_len`` tokens), against the single expert over it; ``decode``: greedy decoding of
``--decode-tokens`` tokens after the window's first 32 tokens, routed on that prompt, against
the single expert. Medians over rounds of the summed time over windows; one ORT thread pool of
the default size per session. Then the router alone on prefixes of 16, 32, 64 and 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402
from lm_accuracy_level import decode  # noqa: E402 - the same greedy decode on the KV cache

PROMPT = 32
PREFIX_LENGTHS = (16, 32, 64, 128)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def resident(bundle: str, case: str) -> dict:
    """In this process: open the bundle, make ``case``'s sessions, run one window through each."""
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    base = rss_mb()
    rt = LMRuntime.load(bundle)
    with np.load(rt.bundle.file("report/eval_data.npz")) as z:
        x = z["test_ids"][:1]
    names = rt.expert_names if case == "moqe" else [rt.expert_names[rt.default_expert]]
    if case == "moqe":
        rt._router_probs([x[0]])  # noqa: SLF001 - the router's session, as a routed request makes it
    for n in names:
        rt.session(n).logits(x)
    return {"case": case, "experts": names, "rss_mb": round(rss_mb(), 1), "rss_before_mb": round(base, 1)}


def latency(bundle: str, windows: int, decode_tokens: int, repeats: int) -> dict:
    from moqe_compile.evaluate.latency import time_interleaved
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    rt = LMRuntime.load(bundle)
    with np.load(rt.bundle.file("report/eval_data.npz")) as z:
        ids = z["test_ids"][:windows]
    single = rt.session(rt.expert_names[rt.default_expert])

    def routed(x: np.ndarray):
        return rt.session(rt.expert_names[int(rt._router_probs([x])[0].argmax())])  # noqa: SLF001

    cands = {
        "prefill MoQE": lambda: [routed(w).logits(w[None]) for w in ids],
        "prefill single": lambda: [single.logits(w[None]) for w in ids],
        "decode MoQE": lambda: [decode(routed(w[:PROMPT]), w[:PROMPT], decode_tokens) for w in ids],
        "decode single": lambda: [decode(single, w[:PROMPT], decode_tokens) for w in ids],
    }
    res = time_interleaved(cands, repeats)
    res["ratios"] = {k: round(res[f"{k} MoQE"]["median_ms"] / res[f"{k} single"]["median_ms"], 3)
                     for k in ("prefill", "decode")}
    router_only = time_interleaved({"router": lambda: [rt._router_probs([w]) for w in ids]}, repeats)  # noqa: SLF001
    res["router_ms_per_window"] = round(router_only["router"]["median_ms"] / len(ids), 3)
    # The router's cost against its prefix length (the same network: its sequence axis is symbolic).
    sess = rt._router_session()  # noqa: SLF001
    lengths = {n: ids[:, :n] for n in PREFIX_LENGTHS if n <= ids.shape[1]}
    by_len = time_interleaved({n: (lambda p=p: [sess.run(None, {"input_ids": r[None], "attention_mask": np.ones((1, len(r)),
                                                                                                               np.int64)})
                                                 for r in p]) for n, p in lengths.items()}, repeats)
    res["router_ms_by_prefix"] = {str(n): round(v["median_ms"] / len(ids), 3) for n, v in by_len.items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resident", choices=["moqe", "single"], help=argparse.SUPPRESS)  # the child's job
    add_json_option(ap)
    args = ap.parse_args()
    if args.resident:
        print(json.dumps(resident(args.bundle, args.resident)))
        return
    mem = {}
    for case in ("moqe", "single"):
        out = subprocess.run([sys.executable, __file__, args.bundle, "--resident", case], check=True,
                             capture_output=True, text=True).stdout
        mem[case] = json.loads(out.strip().splitlines()[-1])
    mem["ratio"] = round(mem["moqe"]["rss_mb"] / mem["single"]["rss_mb"], 3)
    print(f"resident: MoQE {mem['moqe']['rss_mb']:.0f} MB ({len(mem['moqe']['experts'])} experts + router), "
          f"single {mem['single']['rss_mb']:.0f} MB ({mem['single']['experts'][0]}): x{mem['ratio']}")
    lat = latency(args.bundle, args.windows, args.decode_tokens, args.repeats)
    for k, v in lat.items():
        if isinstance(v, dict) and "median_ms" in v:
            print(f"{k:15s} median {v['median_ms']:10.1f} ms  IQR {v['iqr_ms']}")
    print(f"MoQE / single: {lat['ratios']}; router {lat['router_ms_per_window']} ms per window; "
          f"router ms by prefix length {lat['router_ms_by_prefix']}")
    write_json(args.json, {"bundle": Path(args.bundle).name, "windows": args.windows,
                           "decode_tokens": args.decode_tokens, "repeats": args.repeats, "memory": mem,
                           "latency": lat})


if __name__ == "__main__":
    main()
