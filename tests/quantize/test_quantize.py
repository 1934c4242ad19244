import numpy as np
import onnxruntime as ort
import pytest

from moqe_compile.tasks.image.config import ExpertRecipe
from moqe_compile.quantize import calibrate_ranges, count_integer_kernels, prepare_for_quantization, write_expert

from ..conftest import CROP


@pytest.fixture(scope="module")
def prepared(tiny_onnx, tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    x = np.random.default_rng(0).normal(size=(48, 3, CROP, CROP)).astype(np.float32)
    x[:4] *= 6.0  # a few outliers so MinMax and clipping calibrators disagree
    return prepare_for_quantization(tiny_onnx, d / "prep.onnx"), x, d


def test_calibrators_give_different_ranges(prepared):
    model, x, d = prepared
    out = {}
    for r in [ExpertRecipe(name="mm", calibration="minmax"), ExpertRecipe(name="en", calibration="entropy"),
              ExpertRecipe(name="pc", calibration="percentile", percentile=99.9)]:
        out[r.name] = calibrate_ranges(model, "input", x, r, d / f"{r.name}.json").read_text()
    # The DESIGN.md trap: through quantize_static, Entropy silently equalled MinMax.
    assert out["mm"] != out["en"] and out["mm"] != out["pc"] and out["en"] != out["pc"]


def test_u8s8_expert_runs_integer_kernels(prepared):
    model, x, d = prepared
    r = ExpertRecipe(name="mm", calibration="minmax")
    ranges = calibrate_ranges(model, "input", x, r, d / "mm2.json")
    info = write_expert(model, ranges, r, "onnxruntime-cpu", d / "mm.onnx")
    assert info["format"] == "qdq-u8s8" and info["activation_type"] == "QUInt8"
    k = count_integer_kernels(d / "mm.onnx")
    # All 3 convolutions and the classifier run as integer kernels; none stays float.
    assert k["integer"].get("QLinearConv") == 3
    assert k["integer"].get("QGemm", 0) + k["integer"].get("QLinearMatMul", 0) == 1
    assert k["float"] == {}
    fp = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x[4:]})[0]
    q = ort.InferenceSession(str(d / "mm.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x[4:]})[0]
    cos = (fp * q).sum(1) / np.linalg.norm(fp, axis=1) / np.linalg.norm(q, axis=1)
    assert cos.mean() > 0.95


def test_fp_model_is_not_counted_as_integer(prepared):
    model, _, _ = prepared
    k = count_integer_kernels(model)
    assert k["integer"] == {} and sum(k["float"].values()) == 4
