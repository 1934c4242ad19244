"""The LM build's scoring stage, before and after its in-place log-softmax, side by side.

    python bench/lm_score_speed.py bundles/smollm2-135m --windows 4 --rounds 3 [--json PATH]

Scoring runs the FP decoder and every expert over each window and reduces the vocabulary-sized
logits to the loss, KL to FP and top-1 agreement (tasks/causal_lm/score.py); it is most of an LM
build's time once there are a few hundred windows. ``before`` is the plain formulas with fresh
arrays per step (how the build scored before, the reference of tests/tasks/causal_lm/test_score.py),
``after`` is ``score_windows``; ``loss only`` is ``score_windows`` with no KL and agreement (what
the copies control gets), ``no FP`` without the FP pass too (router_train, and each candidate of
an accuracy-budget search, which scores FP once). Per round, interleaved, each variant scores the same first
``--windows`` test windows of the bundle with the same sessions; medians of seconds per window
and model, and the per-window losses of ``after`` against ``before`` (they must be equal).
``forward b1`` / ``forward b4``: the decoders' forward passes alone, one window per run or
four: what batching windows per run would save (the build runs one window per run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def before(fp, experts, ids):
    """The plain formulas (fresh arrays per step)."""
    from moqe_compile.evaluate.losses import log_softmax

    loss = np.zeros((len(ids), len(experts)))
    for i, row in enumerate(ids):
        x = row[None]
        flp = log_softmax(fp.logits(x)[:, :-1], dtype=None)
        p, top = np.exp(flp), flp.argmax(-1)
        for j, e in enumerate(experts):
            elp = log_softmax(e.logits(x)[:, :-1], dtype=None)
            loss[i, j] = -np.take_along_axis(elp, x[:, 1:, None], -1)[..., 0].astype(np.float64).mean()
            (p * (flp - elp)).sum(-1, dtype=np.float64).mean()
            (elp.argmax(-1) == top).mean()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    add_json_option(ap)
    args = ap.parse_args()

    from moqe_compile.tasks.causal_lm.runtime import LMRuntime
    from moqe_compile.tasks.causal_lm.score import score_windows

    rt = LMRuntime.load(args.bundle)
    with np.load(rt.bundle.file("report/eval_data.npz")) as z:
        ids = z["test_ids"][: args.windows]
    fp, experts = rt.session("fp"), [rt.session(n) for n in rt.expert_names]
    models = 1 + len(experts)
    variants = {
        "before": lambda: before(fp, experts, ids),
        "after": lambda: score_windows(fp, experts, ids, mix_of=0).loss,
        "loss only": lambda: score_windows(fp, experts, ids, mix_of=0, detail_of=0).loss,
        "no FP": lambda: score_windows(None, experts, ids, mix_of=0).loss,
        "forward b1": lambda: [s.logits(ids[i : i + 1]) for s in (fp, *experts) for i in range(len(ids))],
        "forward b4": lambda: [s.logits(ids[i : i + 4]) for s in (fp, *experts) for i in range(0, len(ids), 4)],
    }
    times = {k: [] for k in variants}
    out = {}
    for _ in range(args.rounds):
        for k, f in variants.items():
            t0 = time.perf_counter()
            out[k] = f()
            times[k].append((time.perf_counter() - t0) / (len(ids) * models))
    med = {k: float(np.median(v)) for k, v in times.items()}
    res = {"bundle": Path(args.bundle).name, "windows": len(ids), "models": models, "rounds": args.rounds,
           "seconds_per_window_and_model": med,
           "after_vs_before": med["after"] / med["before"], "loss_only_vs_before": med["loss only"] / med["before"],
           "no_fp_vs_before": med["no FP"] / med["before"],
           "forward_b4_vs_b1": med["forward b4"] / med["forward b1"],
           "max_abs_loss_difference": float(np.abs(out["after"] - out["before"]).max()),
           "loss_only_equal": bool(np.array_equal(out["loss only"], out["before"])),
           "no_fp_equal": bool(np.array_equal(out["no FP"], out["before"]))}
    for k, v in med.items():
        print(f"{k:12s} {v:.3f} s per window and model")
    print(f"after / before {res['after_vs_before']:.3f}; loss only / before {res['loss_only_vs_before']:.3f}; "
          f"no FP / before {res['no_fp_vs_before']:.3f}; "
          f"forward b4 / b1 {res['forward_b4_vs_b1']:.3f}; max |loss after - before| {res['max_abs_loss_difference']:.2e}")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
