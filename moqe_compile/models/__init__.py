"""Model sources: each gives an FP ONNX file with a symbolic batch dimension + class labels."""

from .loader import FPModel, load_fp_model

__all__ = ["FPModel", "load_fp_model"]
