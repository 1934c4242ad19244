"""The cuda-python device layer where no GPU is: errors name the failing call; buffers grow
and are reused (with the host-memory stand-in)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from moqe_compile.backends.cuda_device import Buffers, CudaDevice, host_view
from moqe_compile.errors import BackendError

from .fakes import HostDevice


@pytest.mark.skipif(os.path.exists("/dev/nvidia0") or importlib.util.find_spec("cuda") is None,
                    reason="checks the no-GPU error of cuda-python")
def test_without_a_gpu_the_error_names_the_call():
    with pytest.raises(BackendError, match=r"cudaGetDeviceCount failed: cudaError\w+ \(.+\)"):
        CudaDevice()


def test_buffers_grow_to_the_largest_request_and_are_reused():
    dev = HostDevice()
    b = Buffers(dev)
    p1 = b.device_ptr("x", 100)
    assert b.device_ptr("x", 60) == p1 and dev.count("malloc") == 1
    p2 = b.device_ptr("x", 200)
    assert dev.count("malloc") == 2 and dev.count("free") == 1 and b.device_ptr("x", 200) == p2
    h = b.host_array("y", np.float32, (2, 3))
    h[...] = 7
    again = b.host_array("y", np.float32, (1, 3))  # a smaller view of the same pinned buffer
    assert again.ctypes.data == h.ctypes.data and (again == 7).all()
    b.close()
    assert dev.live() == 0


def test_host_view_aliases_memory():
    a = np.arange(6, dtype=np.float32)
    v = host_view(a.ctypes.data, a.nbytes, np.float32, (2, 3))
    v[1, 2] = -1
    assert a[5] == -1
