"""Write one expert's Q/DQ graph for a backend from calibrated ranges.

ONNX Runtime CPU executes INT8 fast only as U8S8 (uint8 activations, int8 weights);
S8S8 measured *slower* than FP32 on this machine. ``reduce_range`` (7-bit weights)
avoids int16 accumulator saturation on x86 CPUs without VNNI, so it follows the CPU.
"""

from __future__ import annotations

import functools
from pathlib import Path

from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from ..config import ExpertRecipe
from ..errors import ConfigError
from .calibrate import METHODS

VARIANTS = {
    # backend -> (activation type, weight type, format label)
    "onnxruntime-cpu": (QuantType.QUInt8, QuantType.QInt8, "qdq-u8s8"),
}


@functools.cache
def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))


def write_expert(prepared: Path, ranges_json: Path, recipe: ExpertRecipe, backend: str, out: Path) -> dict:
    """Quantize ``prepared`` with the cached ranges; return the variant's manifest entry (sans hashes)."""
    if backend not in VARIANTS:
        raise ConfigError(f"no Q/DQ variant for backend {backend!r}; known: {sorted(VARIANTS)}.")
    act, wt, label = VARIANTS[backend]
    reduce_range = backend == "onnxruntime-cpu" and not cpu_has_vnni()
    quantize_static(
        str(prepared), str(out), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
        per_channel=recipe.per_channel, reduce_range=reduce_range,
        activation_type=act, weight_type=wt, calibrate_method=METHODS[recipe.calibration],
        calibration_cache_path=str(ranges_json),
        extra_options={"ActivationSymmetric": recipe.symmetric_activations},
    )
    return {"format": label, "activation_type": act.name, "weight_type": wt.name,
            "per_channel": recipe.per_channel, "reduce_range": reduce_range}
