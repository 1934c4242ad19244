"""The CUDA kernel compiles here (nvcc, no GPU needed) so it never rots; its library loads
and its host-side checks answer without a GPU. Numbers are checked on a GPU in tests/gpu."""

from __future__ import annotations

import os
import shutil

import pytest

from moqe_compile.backends import kernels
from moqe_compile.errors import BackendError

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    d = tmp_path_factory.mktemp("kbuild")
    # both the library and the llm.c-style standalone check binary (validation + timing main),
    # side by side: each nvcc run is mostly single-threaded host compilation
    with ThreadPoolExecutor(2) as pool:
        lib, check = pool.map(lambda t: kernels.build(t, d), ["all", "check"])
    return lib, check


def test_nvcc_builds_library_and_check_binary(built):
    lib, check = built
    assert lib.stat().st_size > 0 and os.access(check, os.X_OK)


def test_library_exports_the_c_abi(built):
    lib = kernels.load_router_attention(built[0])
    assert lib._lib.moqe_attn_abi_version() == kernels.ABI_VERSION
    # host-side validation runs before any CUDA call, so these hold without a GPU
    args = dict(q=1, k=1, v=1, out=1, mask=None, b=1, h=8, t=64, d=8, tau=0.35, dtype=kernels.FP32, stream=None)

    def call(**kw) -> int:
        return lib.status(0, *{**args, **kw}.values())

    assert call(q=None) == 1
    assert call(b=0) == 1
    assert call(tau=float("inf")) == 1
    assert call(d=129) == 2
    assert call(t=4097) == 2
    assert call(dtype=7) == 2
    assert lib.status(5, *args.values()) == 2  # no kernel version 5


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="checks the no-GPU error path")
def test_without_a_gpu_the_call_fails_cleanly(built):
    lib = kernels.load_router_attention(built[0])
    # dangling device pointers are never touched: the launch fails for want of a device
    with pytest.raises(BackendError, match=r"3 \(CUDA error\): cuda"):
        lib.run(16, 16, 16, 16, 1, 8, 64, 8, 0.35)
