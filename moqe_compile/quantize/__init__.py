"""Experts: calibration recipes -> per-backend Q/DQ ONNX graphs, and graph checks."""

from .calibrate import calibrate_ranges, prepare_for_quantization
from .check import count_integer_kernels
from .qdq import cpu_has_vnni, write_expert

__all__ = ["calibrate_ranges", "prepare_for_quantization", "count_integer_kernels", "cpu_has_vnni", "write_expert"]
