"""``moqe-compile eval``: argument parsing; the bundle's task (``tasks/<task>/eval.py``) does the rest."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="re-score a bundle (FP, experts, oracle, MoQE) with CIs, paired tests, latency")
    e.add_argument("bundle", help="bundle directory")
    e.add_argument("--data", default="test",
                   help="'test' (default) or 'router_val' (the bundle's stored splits), a directory of images in "
                        "class-index sub-folders (or flat, unlabelled), or a .npz with x (float32 N,C,H,W) and optional "
                        "y; "
                        "causal-LM bundles: also wiki, c4, tiny (a corpus's test windows) or a UTF-8 text file")
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
    """Hand ``args`` to the bundle's task's ``evaluate``; the task is read from its manifest
    within the bundle reader's limits (a malformed manifest is a ``BundleError``)."""
    from moqe_compile import task_of_bundle

    return task_of_bundle(args.bundle).evaluate(args)
