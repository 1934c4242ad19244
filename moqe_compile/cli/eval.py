"""``moqe-compile eval``: argument parsing; the bundle's task (``tasks/<task>/eval.py``) does the rest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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
    """Read the bundle's manifest and hand ``args`` to its task's ``evaluate``."""
    from moqe_compile.tasks import task_of

    return task_of(_manifest(args.bundle)).evaluate(args)


def _manifest(bundle: str) -> dict:
    """The bundle's manifest as JSON, unchecked: the task's reader checks it (hashes, format)
    and reports what is wrong with it."""
    path = Path(bundle) / "manifest.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # the image reader names the missing or broken manifest
    return doc if isinstance(doc, dict) else {}
