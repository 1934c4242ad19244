"""The lottery control (DESIGN.md section 8): the oracle of K copies of ONE recipe, each
calibrated on a disjoint random subset of the calibration split. If a MoQE expert set's oracle
headroom is no larger than this, the headroom is quantization noise, not expert specialization.

    python bench/perturbed_copies.py bundles/fmnist-w4a8-menu.toml --preset w4a8-adaround --copies 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moqe_compile.backends import OrtCpuSession
from moqe_compile.config import ExpertRecipe, load_recipe
from moqe_compile.data.datasets import build_splits
from moqe_compile.data.images import Preprocess
from moqe_compile.models import load_fp_model
from moqe_compile.quantize import build_expert, prepare_for_quantization
from moqe_compile.score import diversity, run_batched


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--adaround-iters", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory(prefix="moqe-copies-") as tmp:
        work = Path(tmp)
        fp = load_fp_model(cfg.model, cfg.preprocessing, work / "fp.onnx")
        splits = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))
        calib, test = splits["calibration"].x, splits["test"]
        prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
        fp_logits = run_batched(OrtCpuSession("fp", fp.path), test.x, 256)
        parts = np.array_split(np.random.default_rng(args.seed).permutation(len(calib)), args.copies)
        names, logits = [], []
        for i, idx in enumerate(parts):
            r = ExpertRecipe.from_preset(f"copy{i}", args.preset, adaround_iters=args.adaround_iters)
            out = work / f"copy{i}.onnx"
            build_expert(prepared, fp.input_name, calib[np.sort(idx)], r, ["onnxruntime-cpu"],
                         {"onnxruntime-cpu": out}, work / f"copy{i}.json", work)
            names.append(r.name)
            logits.append(run_batched(OrtCpuSession(r.name, out), test.x, 256))
    d = diversity(np.stack(logits), names, fp_logits, test.labels)
    d.update(preset=args.preset, copies=args.copies, calibration_per_copy=int(len(parts[0])),
             single_values={n: float((l.argmax(-1) == (test.labels if test.labels is not None else fp_logits.argmax(-1))).mean())
                            for n, l in zip(names, logits)})
    print(json.dumps({k: v for k, v in d.items() if k != "pairwise_disagreement"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=2))


if __name__ == "__main__":
    main()
