"""Execution backends. ONNX Runtime CPU is the embedded default; GPU backends import lazily.

``BACKENDS`` maps the names a bundle's ``backends`` list and ``experts[].variants`` use to
the session class ``Runtime`` creates per graph: ``onnxruntime-cpu`` (U8S8 graphs) and
``tensorrt`` (S8S8 graphs: a TensorRT engine from the bundle, or that graph on ONNX
Runtime when no engine fits). ``GPU_BACKENDS`` are the sessions ``tasks.image.runtime_gpu.GpuRuntime``
drives with CUDA streams; ``onnxruntime-cuda`` runs a bundle's existing Q/DQ graphs and has
no variant of its own, so it is served by ``GpuRuntime``, not ``Runtime``.
"""

from moqe_compile.backends.base import Session
from moqe_compile.backends.onnxruntime_cpu import OrtCpuSession
from moqe_compile.backends.onnxruntime_cuda import OrtCudaSession
from moqe_compile.backends.tensorrt import TensorRTSession

BACKENDS = {"onnxruntime-cpu": OrtCpuSession, "tensorrt": TensorRTSession}
GPU_BACKENDS = {"onnxruntime-cuda": OrtCudaSession, "tensorrt": TensorRTSession}
# backends that need a GPU to be worth choosing: "auto" skips them on machines without one
_NEEDS_GPU = {"tensorrt"}


def resolve_backend(name: str, available: list[str]) -> str:
    from moqe_compile.errors import BackendError

    if name == "auto":
        from moqe_compile.backends.cuda_device import gpu_visible

        for candidate in BACKENDS:  # CPU first: a GPU backend is asked for by name
            if candidate in available and (candidate not in _NEEDS_GPU or gpu_visible()):
                return candidate
        raise BackendError(f"bundle offers backends {available}; this runtime supports {sorted(BACKENDS)}"
                           f"{' (tensorrt only on a machine with an NVIDIA GPU)' if 'tensorrt' in available else ''}.")
    if name in GPU_BACKENDS and name not in BACKENDS:
        raise BackendError(f"backend {name!r} runs through moqe_compile.tasks.image.runtime_gpu.GpuRuntime.load(bundle, "
                           f"backend={name!r}); Runtime serves {sorted(BACKENDS)}.")
    if name not in BACKENDS:
        from moqe_compile.errors import ConfigError

        # a misspelt option, not a backend that failed: the config code, not the backend one
        raise ConfigError(f"unknown backend {name!r}; supported: {sorted(BACKENDS)} or 'auto'.")
    if name not in available:
        raise BackendError(f"bundle was not built for backend {name!r}; it offers {available}.")
    return name


__all__ = ["Session", "OrtCpuSession", "OrtCudaSession", "TensorRTSession", "BACKENDS", "GPU_BACKENDS",
           "resolve_backend"]
