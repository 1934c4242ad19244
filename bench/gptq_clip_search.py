"""The `strongest` preset's clip search (GPTQ once per candidate scale, best per output channel):
one GPTQ pass per candidate against the stacked pass ``quantize/gptq.py`` runs, on MobileNetV2's
weight shapes with random weights and correlated inputs. Seconds of each (medians over rounds,
interleaved) and whether the integers and scales are identical.

    python bench/gptq_clip_search.py --rounds 5 [--json PATH]

No model or data needed; one torch thread (the build's setting for the column loop).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_json_option, write_json  # noqa: E402

# (out channels, in channels per group, kernel, groups): MobileNetV2's distinct layer kinds.
SHAPES = [(32, 3, 3, 1), (96, 1, 3, 96), (24, 96, 1, 1), (144, 24, 1, 1), (64, 192, 1, 1),
          (320, 960, 1, 1), (1280, 320, 1, 1), (960, 1, 3, 960)]


def per_candidate(w, qmax, hessian, candidates, damp=0.01):
    """The definition: one GPTQ pass per candidate, the lowest-error candidate per channel."""
    from moqe_compile.quantize.gptq import gptq_round, row_errors

    best_err = best_q = best_s = None
    for s in candidates:
        q = gptq_round(w, s, qmax, hessian, damp)
        err = row_errors(w, q, s, hessian)
        if best_err is None:
            best_err, best_q, best_s = err, q.copy(), s.astype(np.float32).copy()
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q[better], best_s[better] = q[better], s[better]
    return best_q, best_s


def main() -> int:
    import torch

    from moqe_compile.quantize.gptq import Hessian, gptq_clip_search
    from moqe_compile.quantize.sequential import clip_candidates

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    add_json_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows, total = [], {"per_candidate": 0.0, "stacked": 0.0}
    for m, cin, kk, groups in SHAPES:
        w = rng.normal(size=(m, cin, kk, kk)).astype(np.float32)
        cols = cin * kk * kk
        h = Hessian(cols, groups)
        x = rng.normal(size=(2048, groups, cols)) @ (np.eye(cols) + 0.3 * rng.normal(size=(cols, cols)))
        h.add_rows(torch.from_numpy(x))
        cand = clip_candidates(w, 127)
        times = {"per_candidate": [], "stacked": []}
        for _ in range(args.rounds):
            for name, fn in (("per_candidate", per_candidate), ("stacked", gptq_clip_search)):
                t = time.perf_counter()
                out = fn(w, 127, h, cand)
                times[name].append(time.perf_counter() - t)
                if name == "per_candidate":
                    ref = out
        same = bool(np.array_equal(ref[0], out[0]) and np.array_equal(ref[1].reshape(-1), out[1].reshape(-1)))
        med = {k: float(np.median(v)) for k, v in times.items()}
        for k in total:
            total[k] += med[k]
        rows.append({"shape": [m, cin, kk, kk], "groups": groups, "candidates": len(cand), **med,
                     "speedup": med["per_candidate"] / med["stacked"], "identical": same})
        print(f"{m}x{cin}x{kk}x{kk} groups {groups}: per candidate {med['per_candidate']:.3f} s, stacked "
              f"{med['stacked']:.3f} s ({rows[-1]['speedup']:.1f}x), identical {same}", flush=True)
    print(f"sum of medians: {total['per_candidate']:.2f} s -> {total['stacked']:.2f} s "
          f"({total['per_candidate'] / total['stacked']:.1f}x)")
    write_json(args.json, {"rounds": args.rounds, "rows": rows, "total": total})
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
