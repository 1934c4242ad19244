"""What every benchmark script shares: the ``--json PATH`` option and its writer, and the GPU check.

Scripts are run by path (``python bench/latency.py``, ``python bench/gpu/latency.py``,
``python bench/studies/fashion_mnist/w2a8_cost.py``), not as modules, so each script that uses
this puts ``bench/`` on ``sys.path`` at the end of its imports and then imports ``common``.
Nothing here imports torch or the package at module level, so a script's ``--help`` works
without them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
# The exit status of a GPU benchmark on a machine without one: a skip, not a failure of the code.
NO_GPU = 2


def add_json_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="write the figures to PATH as JSON (results of record: bench/results/<hardware>/)")


def write_json(path: str | Path | None, obj) -> None:
    """Write ``obj`` to ``path`` (a no-op for ``None``, so scripts call it unconditionally)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def gpu_missing() -> bool:
    """True, with the reason on stderr, when torch sees no CUDA device; return :data:`NO_GPU` then."""
    import torch

    if torch.cuda.is_available():
        return False
    print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
    return True


def served_and_fp_paths(rt) -> tuple[str, dict]:
    """(the expert a bundle serves by default, {"int8": its ORT CPU graph, "fp32": the FP graph})."""
    e = rt.manifest["experts"][rt.default_expert]
    return rt.expert_names[rt.default_expert], {"int8": rt.root / e["variants"]["onnxruntime-cpu"]["path"],
                                                "fp32": rt.root / rt.manifest["model"]["fp"]["path"]}
