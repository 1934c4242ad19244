"""Build and load the fused router-attention kernel (``kernels/``) through ctypes.

Nothing else in the package needs the kernel: ``import moqe_compile.backends.kernels`` costs nothing,
and a missing library raises :class:`BackendError` (with the command that builds it) only
when something asks for it. Two libraries come from ``kernels/Makefile``:

- ``libmoqe_router_attention.so`` (``make -C kernels``, needs nvcc): the CUDA entry points,
  taking device pointers and a ``cudaStream_t``;
- ``libmoqe_router_attention_ref.so`` (``make -C kernels ref``, any C compiler): the CPU
  reference the GPU kernel is validated against.

``MOQE_ROUTER_ATTENTION_LIB`` / ``MOQE_ROUTER_ATTENTION_REF_LIB`` point at prebuilt copies.
The kernels' sources live in the repository (``kernels/``), not in the wheel: build from a
checkout.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from moqe_compile.errors import BackendError, InputError

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"  # in the source checkout, beside the package
LIB_NAME = "libmoqe_router_attention.so"
REF_NAME = "libmoqe_router_attention_ref.so"
ABI_VERSION = 1  # MOQE_ATTN_ABI_VERSION in router_attention.h
MAX_HEAD_DIM, MAX_SEQ = 128, 4096

FP32, FP16 = 0, 1
STATUS = {0: "ok", 1: "invalid argument", 2: "unsupported", 3: "CUDA error"}
BUILD_HINT = "build it with `make -C kernels` (needs nvcc) or moqe_compile.backends.kernels.build()"


def build(target: str = "all", build_dir: str | Path | None = None, nvcc: str | None = None,
          cc: str | None = None, timeout: float = 600.0) -> Path:
    """Run ``make -C kernels <target>`` (``all``: the CUDA library, ``ref``: the CPU reference,
    ``check``: the standalone validation binary) and return the file it made. ``build_dir``
    defaults to ``kernels/build``."""
    outputs = {"all": LIB_NAME, "ref": REF_NAME, "check": "router_attention_check"}
    if target not in outputs:
        raise InputError(f"unknown kernel build target {target!r}; known: {sorted(outputs)}.")
    if not (KERNELS_DIR / "Makefile").is_file():
        raise BackendError(f"kernel sources not found at {str(KERNELS_DIR)!r}: build from a source checkout.")
    make = shutil.which("make")
    if make is None:
        raise BackendError("`make` is not installed; it drives the kernel build (kernels/Makefile).")
    nvcc = nvcc or shutil.which("nvcc")
    cc = cc or shutil.which("cc") or shutil.which("gcc")
    if target != "ref" and nvcc is None:
        raise BackendError(f"nvcc not found on PATH: the CUDA kernel cannot be built here ({target!r}).")
    if target == "ref" and cc is None:
        raise BackendError("no C compiler (cc/gcc) found: the CPU reference cannot be built.")
    bdir = Path(build_dir).resolve() if build_dir else KERNELS_DIR / "build"
    cmd = [make, "-C", str(KERNELS_DIR), target, f"BUILD={bdir}"]
    if nvcc:
        cmd.append(f"NVCC={nvcc}")
    if cc:
        cmd.append(f"CC={cc}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BackendError(f"kernel build {target!r} took over {timeout:.0f} s: {' '.join(cmd)}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise BackendError(f"kernel build {target!r} failed ({' '.join(cmd)}):\n" + "\n".join(tail))
    return bdir / outputs[target]


def _find(env: str, name: str) -> Path | None:
    if os.environ.get(env):
        p = Path(os.environ[env])
        return p if p.is_file() else None
    p = KERNELS_DIR / "build" / name
    return p if p.is_file() else None


def _status_error(what: str, status: int, lib: ctypes.CDLL | None = None) -> BackendError:
    detail = ""
    if status == 3 and lib is not None:
        detail = ": " + lib.moqe_attn_last_cuda_error().decode(errors="replace")
    return BackendError(f"{what} returned {status} ({STATUS.get(status, 'unknown')}){detail}")


def _check_shape(batch: int, heads: int, seq: int, head_dim: int) -> None:
    if min(batch, heads, seq, head_dim) < 1:
        raise InputError(f"attention shape (batch {batch}, heads {heads}, seq {seq}, head_dim {head_dim}) "
                         f"must be positive.")
    if head_dim > MAX_HEAD_DIM or seq > MAX_SEQ:
        raise InputError(f"head_dim {head_dim} / seq {seq} exceed the kernel's {MAX_HEAD_DIM} / {MAX_SEQ}.")


class RouterAttentionLib:
    """The CUDA library: ``run`` enqueues the kernel on ``stream`` and returns at once."""

    def __init__(self, path: Path):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise BackendError(f"router-attention library {str(path)!r} does not load: {e}") from e
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.moqe_attn_abi_version.restype = i
        lib.moqe_attn_last_cuda_error.restype = ctypes.c_char_p
        lib.moqe_router_attention_v.argtypes = [i, p, p, p, p, p, i, i, i, i, f, i, p]
        lib.moqe_router_attention_v.restype = i
        abi = lib.moqe_attn_abi_version()
        if abi != ABI_VERSION:
            raise BackendError(f"router-attention library {str(path)!r} has ABI {abi}; this package needs "
                               f"{ABI_VERSION}: rebuild it ({BUILD_HINT}).")
        self.path, self._lib = path, lib

    def run(self, q: int, k: int, v: int, out: int, batch: int, heads: int, seq: int, head_dim: int, tau: float,
            dtype: int = FP32, key_mask: int | None = None, stream: int = 0, version: int = 0) -> None:
        """Device pointers in (``(batch, heads, seq, head_dim)`` contiguous; ``key_mask``
        ``(batch, seq)`` uint8 or None); raises BackendError on a non-zero status."""
        _check_shape(batch, heads, seq, head_dim)
        st = self._lib.moqe_router_attention_v(version, q, k, v, out, key_mask, batch, heads, seq, head_dim,
                                               float(tau), dtype, stream)
        if st:
            raise _status_error(f"moqe_router_attention (version {version})", st, self._lib)

    def status(self, *args) -> int:
        """The raw status of ``moqe_router_attention_v(*args)`` (tests of the error paths)."""
        return self._lib.moqe_router_attention_v(*args)


_lib_cache: dict[str, RouterAttentionLib] = {}


def load_router_attention(path: str | Path | None = None) -> RouterAttentionLib:
    """The CUDA library (``path``, ``$MOQE_ROUTER_ATTENTION_LIB`` or ``kernels/build``), or a
    BackendError saying how to build it."""
    found = Path(path) if path else _find("MOQE_ROUTER_ATTENTION_LIB", LIB_NAME)
    if found is None or not found.is_file():
        raise BackendError(f"router-attention CUDA library {LIB_NAME} not found "
                           f"({str(found or KERNELS_DIR / 'build' / LIB_NAME)!r}): {BUILD_HINT}. "
                           f"Nothing else needs it: the runtime runs the router's ONNX graph without it.")
    key = str(found.resolve())
    if key not in _lib_cache:
        _lib_cache[key] = RouterAttentionLib(found)
    return _lib_cache[key]


def available() -> bool:
    try:
        load_router_attention()
        return True
    except BackendError:
        return False


def load_reference(path: str | Path | None = None) -> ctypes.CDLL:
    found = Path(path) if path else _find("MOQE_ROUTER_ATTENTION_REF_LIB", REF_NAME)
    if found is None or not found.is_file():
        raise BackendError(f"router-attention CPU reference {REF_NAME} not found: build it with "
                           f"`make -C kernels ref` or moqe_compile.backends.kernels.build('ref').")
    lib = ctypes.CDLL(str(found))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.moqe_router_attention_ref.argtypes = [p, p, p, p, p, i, i, i, i, ctypes.c_float]
    lib.moqe_router_attention_ref.restype = i
    return lib


def router_attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, tau: float,
                         key_mask: np.ndarray | None = None, lib: ctypes.CDLL | None = None) -> np.ndarray:
    """softmax(q k^T * tau + bias) v through the C reference; (B, H, T, D) float32 arrays,
    ``key_mask`` (B, T), nonzero = real key."""
    lib = lib or load_reference()
    q, k, v = (np.ascontiguousarray(a, np.float32) for a in (q, k, v))
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise InputError(f"q, k, v must share one (B, H, T, D) shape; got {q.shape}, {k.shape}, {v.shape}.")
    b, h, t, d = q.shape
    _check_shape(b, h, t, d)
    m = None
    if key_mask is not None:
        m = np.ascontiguousarray(key_mask != 0, np.uint8)
        if m.shape != (b, t):
            raise InputError(f"key_mask has shape {m.shape}; expected {(b, t)}.")
    out = np.empty_like(q)
    st = lib.moqe_router_attention_ref(q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data,
                                       None if m is None else m.ctypes.data, b, h, t, d, float(tau))
    if st:
        raise _status_error("moqe_router_attention_ref", st)
    return out


def router_attention_torch(q, k, v, tau: float, key_mask=None, version: int = 0,
                           lib: RouterAttentionLib | None = None):
    """The CUDA kernel on torch CUDA tensors (B, H, T, D), fp32 or fp16, enqueued on torch's
    current stream; returns a new tensor. For tests and benchmarks."""
    import torch

    lib = lib or load_router_attention()
    if q.dtype not in (torch.float32, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one of float32/float16.")
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise InputError("q, k, v must be CUDA tensors.")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, t, d = q.shape
    out = torch.empty_like(q)
    m = None
    if key_mask is not None:
        m = (key_mask != 0).to(device=q.device, dtype=torch.uint8).contiguous()
    lib.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, t, d, tau,
            FP16 if q.dtype == torch.float16 else FP32, None if m is None else m.data_ptr(),
            torch.cuda.current_stream(q.device).cuda_stream, version)
    return out
