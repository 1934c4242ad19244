"""ONNX Runtime's entropy (KL) threshold search against moqe-compile's vectorized copy of it, on the
activation histograms of a real network: seconds for each and whether every tensor's chosen
range is identical.

    python bench/entropy_search.py mobilenetv2-demo --samples 32 [--json PATH]

The histograms are collected once, by ORT's own collector (2048 bins, as the `entropy` expert
uses) over the recipe's calibration split; both searches then run on the same histograms, ORT's
first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_json_option, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="a shipped image recipe name or a TOML path")
    ap.add_argument("--samples", type=int, default=32, help="calibration views to collect histograms on")
    ap.add_argument("--bins", type=int, default=2048)
    add_json_option(ap)
    args = ap.parse_args()

    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    from moqe_compile import recipes
    from moqe_compile.quantize import prepare_for_quantization
    from moqe_compile.quantize.calibrate import ArrayReader
    from moqe_compile.quantize.entropy import entropy_thresholds
    from moqe_compile.tasks.image.config import load_recipe
    from moqe_compile.tasks.image.data import build_splits
    from moqe_compile.tasks.image.model import load_fp_model
    from moqe_compile.tasks.image.preprocess import Preprocess

    cfg = load_recipe(recipes.path(args.recipe))
    with tempfile.TemporaryDirectory(prefix="entropy-bench-") as tmp:
        fp = load_fp_model(cfg.model, cfg.preprocessing, Path(tmp) / "fp.onnx")
        x = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))["calibration"].x[: args.samples]
        prepared = prepare_for_quantization(fp.path, Path(tmp) / "prepared.onnx")
        cal = create_calibrator(str(prepared), None, augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                calibrate_method=CalibrationMethod.Entropy,
                                extra_options={"symmetric": False, "num_bins": args.bins})
        with contextlib.redirect_stdout(io.StringIO()):  # ORT prints its progress
            for i in range(0, len(x), 16):
                cal.collect_data(ArrayReader(fp.input_name, x[i:i + 16], batch=16))
            col = cal.collector
            t = time.perf_counter()
            theirs = col.compute_entropy()
            ort_s = time.perf_counter() - t
            t = time.perf_counter()
            ours = entropy_thresholds(col.histogram_dict, col.num_quantized_bins)
            ours_s = time.perf_counter() - t
    same = sum((ours[k][0], ours[k][1]) == (theirs[k][0], theirs[k][1]) for k in theirs)
    res = {"recipe": args.recipe, "samples": int(len(x)), "tensors": len(theirs), "identical": same,
           "ort_seconds": round(ort_s, 2), "ours_seconds": round(ours_s, 2), "speedup": round(ort_s / ours_s, 2)}
    print(res)
    write_json(args.json, res)
    return 0 if same == len(theirs) else 1


if __name__ == "__main__":
    sys.exit(main())
