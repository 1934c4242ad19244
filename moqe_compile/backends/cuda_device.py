"""Streams, events and memory through cuda-python (``cuda.bindings.runtime``), imported lazily.

cuda-python is NVIDIA's maintained binding (pycuda had no wheel for the GPU machine the project
was tested on); it returns ``(cudaError_t, value...)`` tuples, which :func:`_ok` turns into
BackendErrors naming the call. Handles (streams, events, pointers) are plain ints so that ONNX Runtime
(``user_compute_stream``, ``bind_input(buffer_ptr=...)``) and TensorRT
(``set_tensor_address``, ``execute_async_v3``) take them directly.

The GPU backends and ``tasks/image/runtime_gpu.py`` talk to a device only through the methods of
:class:`CudaDevice`, so their logic is tested on the CPU with a host-memory stand-in
(tests/backends/fakes.py).
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from moqe_compile.errors import BackendError


def gpu_visible() -> bool:
    """An NVIDIA device node exists (the tests' ``gpu`` marker uses the same test); cheap and
    import-free, for ``auto`` backend resolution."""
    return os.path.exists("/dev/nvidia0")


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError as e:
        raise BackendError("cuda-python is not installed (`pip install cuda-python`): the GPU backends "
                           "use it for streams and memory.") from e
    return runtime


class CudaDevice:
    """One CUDA device: streams, events, device and pinned host memory, async copies."""

    def __init__(self, device_id: int = 0):
        self._rt = rt = _cudart()
        count = self._ok(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if device_id >= count:
            raise BackendError(f"CUDA device {device_id} requested; this machine has {count}.")
        self.device_id = device_id
        self._ok(rt.cudaSetDevice(device_id), "cudaSetDevice")
        prop = self._ok(rt.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
        name = prop.name
        self.name = (name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip()
        self.compute_capability = (int(prop.major), int(prop.minor))
        self.runtime_version = int(self._ok(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
        self.driver_version = int(self._ok(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))
        self._kinds = {"h2d": rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                       "d2h": rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                       "d2d": rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice}

    def _ok(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, msg = self._rt.cudaGetErrorString(err)
            raise BackendError(f"{what} failed: {getattr(err, 'name', err)} "
                               f"({msg.decode() if isinstance(msg, bytes) else msg}).")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def _set(self) -> None:
        # the current device is per host thread: a worker thread starts on device 0
        self._ok(self._rt.cudaSetDevice(self.device_id), "cudaSetDevice")

    # streams and events ------------------------------------------------------------------
    def stream(self) -> int:
        """A non-blocking stream: no implicit sync with the legacy default stream, so experts'
        streams overlap with whatever else the process runs."""
        self._set()
        s = self._ok(self._rt.cudaStreamCreateWithFlags(self._rt.cudaStreamNonBlocking), "cudaStreamCreate")
        return int(s)

    def event(self) -> int:
        e = self._ok(self._rt.cudaEventCreateWithFlags(self._rt.cudaEventDisableTiming), "cudaEventCreate")
        return int(e)

    def record(self, event: int, stream: int) -> None:
        self._ok(self._rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def wait(self, stream: int, event: int) -> None:
        self._ok(self._rt.cudaStreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent")

    def synchronize(self, stream: int) -> None:
        self._ok(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy_stream(self, stream: int) -> None:
        self._rt.cudaStreamDestroy(stream)

    def destroy_event(self, event: int) -> None:
        self._rt.cudaEventDestroy(event)

    # memory ------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        self._set()
        return int(self._ok(self._rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._rt.cudaFree(ptr)

    def malloc_host(self, nbytes: int) -> int:
        """Pinned host memory: async copies from/to it really are async (pageable memory is
        staged synchronously by the driver)."""
        return int(self._ok(self._rt.cudaMallocHost(max(int(nbytes), 1)), f"cudaMallocHost({nbytes})"))

    def free_host(self, ptr: int) -> None:
        self._rt.cudaFreeHost(ptr)

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream: int) -> None:
        """Enqueue a copy on ``stream``; ``kind`` is ``h2d``, ``d2h`` or ``d2d``."""
        self._ok(self._rt.cudaMemcpyAsync(dst, src, int(nbytes), self._kinds[kind], stream),
                 f"cudaMemcpyAsync({kind}, {nbytes} bytes)")

    def describe(self) -> dict:
        return {"device": self.name, "compute_capability": "%d.%d" % self.compute_capability,
                "cuda_runtime": self.runtime_version, "cuda_driver": self.driver_version}


def host_view(ptr: int, nbytes: int, dtype, shape) -> np.ndarray:
    """A numpy view of ``nbytes`` at host address ``ptr`` (pinned buffers)."""
    buf = (ctypes.c_byte * int(nbytes)).from_address(int(ptr))
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class Buffers:
    """A device buffer and a pinned host buffer per tensor name, grown to the largest batch
    seen and then reused: no allocation on the steady-state path."""

    def __init__(self, device):
        self.device = device
        self._dev: dict[str, tuple[int, int]] = {}  # name -> (ptr, capacity bytes)
        self._host: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def device_ptr(self, name: str, nbytes: int) -> int:
        with self._lock:
            ptr, cap = self._dev.get(name, (0, 0))
            if nbytes > cap:
                if ptr:
                    self.device.free(ptr)
                ptr = self.device.malloc(nbytes)
                self._dev[name] = (ptr, nbytes)
            return ptr

    def host_array(self, name: str, dtype, shape) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        with self._lock:
            ptr, cap = self._host.get(name, (0, 0))
            if nbytes > cap:
                if ptr:
                    self.device.free_host(ptr)
                ptr = self.device.malloc_host(nbytes)
                self._host[name] = (ptr, nbytes)
            return host_view(ptr, nbytes, dtype, shape)

    def allocations(self) -> int:
        return len(self._dev) + len(self._host)

    def close(self) -> None:
        with self._lock:
            for ptr, _ in self._dev.values():
                self.device.free(ptr)
            for ptr, _ in self._host.values():
                self.device.free_host(ptr)
            self._dev.clear()
            self._host.clear()
