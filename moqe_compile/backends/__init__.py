"""Execution backends. ONNX Runtime CPU is the embedded default; GPU backends import lazily."""

from .base import Session
from .onnxruntime_cpu import OrtCpuSession

BACKENDS = {"onnxruntime-cpu": OrtCpuSession}


def resolve_backend(name: str, available: list[str]) -> str:
    from ..errors import BackendError

    if name == "auto":
        for candidate in BACKENDS:
            if candidate in available:
                return candidate
        raise BackendError(f"bundle offers backends {available}; this runtime supports {sorted(BACKENDS)}.")
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; supported: {sorted(BACKENDS)} or 'auto'.")
    if name not in available:
        raise BackendError(f"bundle was not built for backend {name!r}; it offers {available}.")
    return name


__all__ = ["Session", "OrtCpuSession", "BACKENDS", "resolve_backend"]
