import contextlib
import io

import numpy as np
from onnxruntime.quantization import CalibrationMethod, create_calibrator

from moqe_compile.quantize.calibrate import ArrayReader
from moqe_compile.quantize.entropy import entropy_thresholds

from ..models import class_batch


def _collector(model, x, tmp_path):
    cal = create_calibrator(str(model), None, augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.Entropy,
                            extra_options={"symmetric": False, "num_bins": 512})
    with contextlib.redirect_stdout(io.StringIO()):  # ORT prints its progress
        cal.collect_data(ArrayReader("input", x, batch=len(x)))
    return cal.collector


def test_the_vectorized_search_chooses_ort_thresholds_on_real_activations(tiny_onnx, tmp_path):
    col = _collector(tiny_onnx, class_batch(24)[0], tmp_path)
    ours = entropy_thresholds(col.histogram_dict, col.num_quantized_bins)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = col.compute_entropy()  # ORT's own loop: the oracle
    assert ours.keys() == theirs.keys() and len(ours) > 3
    for name in theirs:
        assert (ours[name][0], ours[name][1]) == (theirs[name][0], theirs[name][1]), name
    # The search did choose: some range is narrower than the tensor's observed one.
    assert any(ours[n][1] < col.histogram_dict[n][3] for n in ours)


def test_a_histogram_with_gaps_and_outliers_matches_ort():
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(3)
    hist = rng.integers(0, 50, 256).astype(np.int64)
    hist[::7] = 0  # empty bins: the smoothing and the per-group norm both see them
    hist[[0, 255]] = [1, 2]  # far outliers, folded into p's end bins
    edges = np.linspace(-4, 4, 257).astype(np.float32)
    h = {"t": (hist, edges, np.float32(-3.9), np.float32(3.5), np.float32(4))}
    col = HistogramCollector("entropy", False, 256, 32, None, None)
    col.histogram_dict = h
    with contextlib.redirect_stdout(io.StringIO()):
        want = col.compute_entropy()["t"]
    got = entropy_thresholds(h, 32)["t"]
    assert (got[0], got[1]) == (want[0], want[1])
