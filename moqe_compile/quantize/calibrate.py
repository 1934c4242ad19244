"""Activation-range calibration with ``onnxruntime.quantization`` calibrators.

We drive ``create_calibrator`` ourselves instead of letting ``quantize_static`` do it
because through ``quantize_static`` the Entropy method keeps its 128-bin default and lands on
MinMax's scales (docs/design.md#calibration); here ``num_bins`` is the caller's.
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
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from moqe_compile.errors import ConfigError
from moqe_compile.quantize.entropy import entropy_thresholds

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
    # ORT has no MSE calibrator: we collect ORT's histograms and choose the ranges ourselves
    # (mse_ranges below). The cache is labelled Percentile only because quantize_static
    # checks that label against its calibrate_method argument.
    "mse": CalibrationMethod.Percentile,
}


def mse_ranges(histograms: dict, asymmetric: bool, levels: int = 256, grid: int = 40) -> dict:
    """Range per tensor minimizing the expected squared quantization error over its histogram.

    ``histograms`` is ORT's HistogramCollector.histogram_dict: name -> (hist, edges, min, max,
    threshold), bins spanning [-threshold, threshold]. Candidate ranges shrink the observed
    [min, max] at each end by factors in [0.05, 1].
    """
    out = {}
    for name, (hist, edges, lo, hi, _thr) in histograms.items():
        hist = np.asarray(hist, np.float64)
        centers = (edges[:-1] + edges[1:]) / 2
        keep = hist > 0
        h, c = hist[keep], centers[keep]
        lo, hi = float(min(lo, 0.0)), float(max(hi, 0.0))
        if not asymmetric:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        if hi - lo <= 0 or len(h) == 0:
            out[name] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            continue
        # Independent shrink factors for each end (a skewed tensor needs them), 40 x 40 grid.
        f = np.linspace(0.05, 1.0, grid)
        if asymmetric:
            fl, fh = np.meshgrid(f, f, indexing="ij")
            clo, chi = (fl * lo).reshape(-1, 1), (fh * hi).reshape(-1, 1)
        else:
            clo, chi = (f * lo)[:, None], (f * hi)[:, None]
        scale = np.maximum((chi - clo) / (levels - 1), 1e-12)
        # Values inside the range carry rounding error ~ s^2/12 (uniform within a step; bin
        # centers alone would alias with the grid), values outside carry their clipping error.
        cc = np.clip(c[None, :], clo, chi)
        err = (h[None, :] * np.where(cc == c[None, :], scale**2 / 12, (c[None, :] - cc) ** 2)).sum(axis=1)
        k = int(err.argmin())
        out[name] = TensorData(lowest=np.float32(clo[k, 0]), highest=np.float32(chi[k, 0]))
    return out


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


def calibrator_options(method: str, symmetric: bool, num_bins: int, percentile: float) -> dict:
    """``extra_options`` of ORT's ``create_calibrator`` for ``method``."""
    if method not in METHODS:
        raise ConfigError(f"calibration method {method!r} is not one of {sorted(METHODS)}.")
    # MSE needs ORT's signed-value histograms (the symmetric collector keeps |x| only).
    extra: dict = {"symmetric": symmetric and method != "mse"}
    if method in ("percentile", "entropy", "mse"):
        extra["num_bins"] = num_bins
    if method == "percentile":
        extra["percentile"] = percentile
    return extra


def calibrate_ranges(model: Path, input_name: str, x: np.ndarray, out_json: Path, method: str = "minmax",
                     symmetric: bool = False, num_bins: int = 2048, percentile: float = 99.999,
                     chunk: int = 16) -> Path:
    """Collect activation ranges over ``x`` by ``method`` (one of ``METHODS``); save them as
    ORT's calibration cache JSON. ``symmetric``: ranges symmetric around 0; ``num_bins``: the
    histogram methods' bins; ``percentile``: the percentile method's cut."""
    extra = calibrator_options(method, symmetric, num_bins, percentile)
    with tempfile.TemporaryDirectory(prefix="moqe-calib-") as tmp:
        cal = create_calibrator(
            str(model), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=METHODS[method], extra_options=extra,
        )
        # One batch per collect_data call: ORT's histogram collector stacks the batches of
        # one call with np.asarray and fails on a ragged last batch. Its progress prints
        # go to stdout, which belongs to our CLI's output, so they are silenced.
        with contextlib.redirect_stdout(io.StringIO()):
            for start in range(0, len(x), chunk):
                cal.collect_data(ArrayReader(input_name, x[start : start + chunk], batch=chunk))
            if method == "mse":
                ranges = TensorsData(METHODS[method], mse_ranges(cal.collector.histogram_dict,
                                                                 asymmetric=not symmetric))
            elif method == "entropy":  # ORT's search, vectorized (quantize/entropy.py)
                ranges = TensorsData(METHODS[method], entropy_thresholds(cal.collector.histogram_dict,
                                                                         cal.collector.num_quantized_bins))
            else:
                ranges = cal.compute_data()
        del cal
    save_tensors_data(ranges, out_json)
    return out_json
