"""A host-memory stand-in for ``CudaDevice``: "device" pointers are addresses of numpy
buffers, copies happen at once, and every call is logged, so the GPU backends' and the GPU
runtime's bookkeeping (buffer reuse, stream per expert, host syncs per batch) is tested on
the CPU. It checks logic only; nothing about CUDA itself."""

from __future__ import annotations

import ctypes
import itertools

import numpy as np


class HostDevice:
    device_id = 0
    name = "host stand-in"
    compute_capability = (9, 0)

    def __init__(self):
        self._mem: dict[int, np.ndarray] = {}
        self._ids = itertools.count(1)
        self.log: list[tuple] = []
        self.streams: list[int] = []

    def _alloc(self, nbytes: int, what: str) -> int:
        a = np.zeros(max(int(nbytes), 1) + 64, np.uint8)
        ptr = a.ctypes.data + (-a.ctypes.data) % 64  # 64-byte aligned, as cudaMalloc's 256
        self._mem[ptr] = a
        self.log.append((what, int(nbytes)))
        return ptr

    def malloc(self, nbytes):
        return self._alloc(nbytes, "malloc")

    def malloc_host(self, nbytes):
        return self._alloc(nbytes, "malloc_host")

    def free(self, ptr):
        self._mem.pop(ptr)
        self.log.append(("free",))

    free_host = free

    def stream(self):
        s = 1000 + next(self._ids)
        self.streams.append(s)
        self.log.append(("stream", s))
        return s

    def event(self):
        return 5000 + next(self._ids)

    def record(self, event, stream):
        self.log.append(("record", event, stream))

    def wait(self, stream, event):
        self.log.append(("wait", stream, event))

    def synchronize(self, stream):
        self.log.append(("sync", stream))

    def destroy_stream(self, stream):
        self.log.append(("destroy_stream", stream))

    def destroy_event(self, event):
        pass

    def copy(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, int(nbytes))
        self.log.append(("copy", kind, int(nbytes), stream))

    def describe(self):
        return {"device": self.name, "compute_capability": "9.0"}

    def count(self, what: str) -> int:
        return sum(1 for e in self.log if e[0] == what)

    def live(self) -> int:
        return len(self._mem)


def host_factory(name, path, device):
    """The IOBinding session factory of the GPU runtime, run under the CPU provider with the host-memory device."""
    from moqe_compile.backends.onnxruntime_cuda import OrtCudaSession

    return OrtCudaSession(name, path, device=device, providers=["CPUExecutionProvider"], device_type="cpu")
