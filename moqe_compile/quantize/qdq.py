"""Write one expert's Q/DQ graph for a backend from calibrated ranges.

ONNX Runtime CPU executes INT8 fast only as U8S8 (uint8 activations, int8 weights;
S8S8 ran slower than FP32 there: docs/results.md#expert-recipes). ``reduce_range`` (7-bit weights)
avoids int16 accumulator saturation on x86 CPUs without VNNI, so it follows the CPU.
TensorRT (and ONNX Runtime CUDA) want symmetric S8S8 with zero-point 0, per-tensor
activations and per-channel weights on axis 0: one set of parameters, one graph per backend.
"""

from __future__ import annotations

import functools
from pathlib import Path

from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from moqe_compile.errors import ConfigError
from moqe_compile.quantize.calibrate import METHODS

# backend -> (activation type, weight type, symmetric activations forced, format label)
VARIANTS = {
    "onnxruntime-cpu": (QuantType.QUInt8, QuantType.QInt8, False, "qdq-u8s8"),
    "tensorrt": (QuantType.QInt8, QuantType.QInt8, True, "qdq-s8s8-symmetric"),
}


@functools.cache
def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))


def reduce_range_for(backend: str) -> bool:
    return backend == "onnxruntime-cpu" and not cpu_has_vnni()


def write_expert(prepared: Path, ranges_json: Path, backend: str, out: Path, method: str = "minmax",
                 symmetric_activations: bool = False, per_channel: bool = True, weight_bits: int = 8,
                 weight_overrides: dict | None = None, exclude: list[str] | None = None,
                 only: list[str] | None = None) -> dict:
    """Quantize ``prepared`` with the ranges cached by ``calibrate_ranges(..., method)``; return
    the variant's manifest entry (sans path).

    ``symmetric_activations`` (forced on TensorRT), ``per_channel`` weights; ``weight_bits`` is
    recorded only: sub-8-bit integer weights come in through ``weight_overrides``
    (TensorQuantOverrides for weights, fixing the integer weight scales we chose). ``exclude``
    lists node names kept in FP; ``only`` (ORT's ``nodes_to_quantize``), when given, the sole
    nodes quantized.
    """
    if backend not in VARIANTS:
        raise ConfigError(f"no Q/DQ variant for backend {backend!r}; known: {sorted(VARIANTS)}.")
    act, wt, force_sym, label = VARIANTS[backend]
    sym = force_sym or symmetric_activations
    reduce_range = reduce_range_for(backend)
    extra = {"ActivationSymmetric": sym, "WeightSymmetric": True,
             # TensorRT's explicit quantization takes float biases; int32 bias DQ nodes are for ORT.
             "QuantizeBias": backend != "tensorrt"}
    if weight_overrides:
        extra["TensorQuantOverrides"] = weight_overrides
    quantize_static(
        str(prepared), str(out), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
        per_channel=per_channel, reduce_range=reduce_range,
        activation_type=act, weight_type=wt, calibrate_method=METHODS[method],
        calibration_cache_path=str(ranges_json), nodes_to_exclude=list(exclude or []),
        nodes_to_quantize=list(only or []),
        extra_options=extra,
    )
    return {"format": label, "activation_type": act.name, "weight_type": wt.name, "weight_bits": weight_bits,
            "per_channel": per_channel, "reduce_range": reduce_range, "symmetric_activations": sym,
            "excluded_nodes": list(exclude or [])}
