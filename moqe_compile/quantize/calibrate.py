"""Activation-range calibration with ``onnxruntime.quantization`` calibrators.

We drive ``create_calibrator`` ourselves instead of letting ``quantize_static`` do it
because (DESIGN.md section 3) through ``quantize_static`` the Entropy method keeps its
128-bin default and lands on MinMax's scales; here ``num_bins`` comes from the recipe.
Data are fed in chunks so the calibrator never holds every intermediate tensor of the
whole calibration set at once (MobileNetV2: ~30 MB per image).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
from onnxruntime.quantization.calibrate import save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..config import ExpertRecipe

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class ArrayReader(CalibrationDataReader):
    """The ORT data-reader protocol over one float32 NCHW array, in batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 8):
        self._name, self._x, self._batch, self._i = input_name, x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._x):
            return None
        out = {self._name: self._x[self._i : self._i + self._batch]}
        self._i += self._batch
        return out


def prepare_for_quantization(fp_path: Path, out: Path) -> Path:
    """Shape inference + ORT graph optimization (BN folding etc.), as ORT recommends before Q/DQ."""
    quant_pre_process(str(fp_path), str(out), skip_symbolic_shape=False)
    return out


def calibrate_ranges(model: Path, input_name: str, x: np.ndarray, recipe: ExpertRecipe, out_json: Path,
                     chunk: int = 16) -> Path:
    """Collect activation ranges for ``recipe`` over ``x``; save them as ORT's calibration cache JSON."""
    method = METHODS[recipe.calibration]
    extra: dict = {"symmetric": recipe.symmetric_activations}
    if recipe.calibration in ("percentile", "entropy"):
        extra["num_bins"] = recipe.num_bins
    if recipe.calibration == "percentile":
        extra["percentile"] = recipe.percentile
    with tempfile.TemporaryDirectory(prefix="moqe-calib-") as tmp:
        cal = create_calibrator(
            str(model), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method, extra_options=extra,
        )
        # One batch per collect_data call: ORT's histogram collector stacks the batches of
        # one call with np.asarray and fails on a ragged last batch. Its progress prints
        # go to stdout, which belongs to our CLI's output, so they are silenced.
        with contextlib.redirect_stdout(io.StringIO()):
            for start in range(0, len(x), chunk):
                cal.collect_data(ArrayReader(input_name, x[start : start + chunk], batch=chunk))
            ranges = cal.compute_data()
        del cal
    save_tensors_data(ranges, out_json)
    return out_json
