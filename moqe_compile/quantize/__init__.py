"""Experts: calibration recipes -> per-backend Q/DQ graphs, and graph checks."""

from .calibrate import calibrate_ranges, prepare_for_quantization
from .check import check_qdq, count_integer_kernels
from .expert import build_expert
from .qdq import cpu_has_vnni, write_expert

__all__ = ["calibrate_ranges", "prepare_for_quantization", "check_qdq", "count_integer_kernels", "build_expert",
           "cpu_has_vnni", "write_expert"]
