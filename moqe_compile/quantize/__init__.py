"""Task-free ONNX quantization passes taking plain parameters: calibration, Q/DQ graphs per
backend, weight rounding (nearest, AdaRound, GPTQ), MatMulNBits, and graph checks."""

from moqe_compile.quantize.calibrate import calibrate_ranges, prepare_for_quantization
from moqe_compile.quantize.check import check_qdq, count_integer_kernels
from moqe_compile.quantize.qdq import cpu_has_vnni, write_expert

__all__ = ["calibrate_ranges", "prepare_for_quantization", "check_qdq", "count_integer_kernels", "cpu_has_vnni", "write_expert"]
