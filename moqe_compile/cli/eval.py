"""``moqe-compile eval``: argument parsing and output of :mod:`moqe_compile.tasks.image.eval`."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="re-score a bundle (FP, experts, oracle, MoQE) with CIs, paired tests, latency")
    e.add_argument("bundle", help="bundle directory")
    e.add_argument("--data", default="test",
                   help="'test' (default) or 'router_val' (the bundle's stored splits), a directory of images in "
                        "class-index sub-folders (or flat, unlabelled), or a .npz with x (float32 N,C,H,W) and optional y")
    e.add_argument("--out", help="output directory (default: <bundle>-eval next to the bundle; never inside it)")
    e.add_argument("--json", action="store_true", help="print the report as JSON instead of the Markdown table")
    e.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="measure router / experts / FP32 / MoQE latency at batch 1 and 32 (default: on)")
    e.add_argument("--repeats", type=int, default=30, help="latency rounds per candidate (default 30)")
    e.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="latency batch sizes (default 1 32)")
    e.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    e.add_argument("--no-verify", action="store_true", help="skip the bundle's sha256 checks")
    e.set_defaults(fn=cmd_eval)


def cmd_eval(args) -> int:
    from moqe_compile.tasks.image.eval import evaluate_bundle, render_markdown
    from moqe_compile import task_of_bundle

    if task_of_bundle(args.bundle).KIND == "causal-lm":  # perplexity report (tasks/causal_lm/eval.py)
        from moqe_compile.tasks.causal_lm.eval import cmd_eval_lm

        return cmd_eval_lm(args)

    report, out = evaluate_bundle(args.bundle, data=args.data, out=args.out, latency=args.latency,
                                  repeats=args.repeats, batches=tuple(args.batches), n_boot=args.resamples,
                                  seed=args.seed, verify=not args.no_verify)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_markdown(report))
        print(f"report written to {out}/ (report.json, report.md, metric.png, usage.png)")
    return 0
