"""Router -> ONNX (opset >= 17, symbolic batch) and safetensors weights for retraining.

``quantize = "int8"`` (RouterConfig) additionally runs ``onnxruntime.quantization``
(static, QDQ U8S8, per-channel weights, MinMax ranges from router-training images) on the
checked float graph; the INT8 graph must pick the same expert as torch on most inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from moqe_compile.errors import BuildError
from moqe_compile.backends.onnxruntime_cpu import session
from moqe_compile.onnx_export import check, check_symbolic, export, save_inline
from moqe_compile.tasks.image.router import CVRouter, CVRouterCore

INPUT_NAME = "input"
OUTPUT_NAME = "expert_probs"
INT8_MIN_ARGMAX_AGREEMENT = 0.9  # share of check inputs where the INT8 router picks torch's expert


def export_router(core: CVRouterCore, input_size: int, crop: int, onnx_path: Path, weights_path: Path,
                  opset: int = 18, channels: int = 3, mode: str = "avgpool", quantize: str = "none",
                  calib_x: np.ndarray | None = None) -> dict:
    """Write ``onnx_path`` (input ``(batch, channels, crop, crop)`` preprocessed images, output
    ``(batch, K)`` expert probabilities) and ``weights_path``; returns export facts for the
    manifest (``quantize``, and for INT8 the check's argmax agreement with torch)."""
    from safetensors.torch import save_file

    if opset < 17:
        raise BuildError(f"router ONNX export needs opset >= 17, got {opset}.")
    model = CVRouter(core, input_size, mode).eval()
    x = torch.randn(2, channels, crop, crop)
    with tempfile.TemporaryDirectory(prefix="moqe-router-") as tmp:
        fp_path = Path(tmp) / "router_fp.onnx" if quantize == "int8" else onnx_path
        export(model, (x,), fp_path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset=opset,
               dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), what="router")
        check_symbolic(fp_path, {INPUT_NAME: [0]}, "router")
        check(model, fp_path, [(x,)], what="router", atol=1e-4, rtol=1e-5)
        info: dict = {"quantize": quantize}
        if quantize == "int8":
            if calib_x is None or len(calib_x) == 0:
                raise BuildError("router quantize = 'int8' needs calibration images (calib_x).")
            info.update(_quantize_int8(fp_path, onnx_path, model, np.ascontiguousarray(calib_x, np.float32),
                                       Path(tmp)))
    save_file({k: v.contiguous() for k, v in core.state_dict().items()}, str(weights_path))
    return info


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return session(path, name="router").run(None, {INPUT_NAME: x})[0]


def _quantize_int8(fp_path: Path, out: Path, model: CVRouter, calib_x: np.ndarray, tmp: Path) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, xs: np.ndarray):
            self._it = iter([{INPUT_NAME: xs[i : i + 16]} for i in range(0, len(xs), 16)])

        def get_next(self):
            return next(self._it, None)

    pre = tmp / "router_pre.onnx"
    try:
        quant_pre_process(str(fp_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(calib_x[:256]), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    except Exception as e:  # noqa: BLE001 - ORT's quantizer raises many types
        raise BuildError(f"router INT8 quantization failed: {e}") from e
    save_inline(out, out)
    check_symbolic(out, {INPUT_NAME: [0]}, "INT8 router")
    check = calib_x[:256]
    with torch.no_grad():
        ref = model(torch.from_numpy(check)).numpy()
    got = _run(out, check)
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    if agree < INT8_MIN_ARGMAX_AGREEMENT:
        raise BuildError(f"INT8 router picks torch's expert on only {agree:.0%} of {len(check)} calibration "
                         f"inputs (< {INT8_MIN_ARGMAX_AGREEMENT:.0%}); use quantize = 'none'.")
    return {"int8_argmax_agreement": round(agree, 4), "int8_max_abs_prob_diff": round(float(np.abs(ref - got).max()), 4)}
