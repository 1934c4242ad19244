"""The router-attention CPU reference (kernels/router_attention_ref.c), compiled with the
system C compiler and checked against numpy and torch on random inputs. The GPU kernel is
validated against this reference (tests/gpu, kernels/router_attention.cu's check binary)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from moqe_compile.backends import kernels
from moqe_compile.errors import BackendError, InputError

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler")


@pytest.fixture(scope="module")
def ref_lib(tmp_path_factory):
    return kernels.load_reference(kernels.build("ref", tmp_path_factory.mktemp("kbuild")))


def numpy_attention(q, k, v, tau, key_mask=None):
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) * tau
    if key_mask is not None:
        s = s + np.where(key_mask[:, None, None, :] != 0, 0.0, -1e4)
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return p @ v.astype(np.float64)


# the CV router's shape, the NLP router's, and odd sizes that hit no fast path
SHAPES = [(1, 8, 64, 8), (5, 8, 64, 8), (2, 4, 128, 32), (1, 4, 512, 128), (3, 2, 7, 5), (2, 1, 1, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_numpy(ref_lib, shape):
    rng = np.random.default_rng(sum(shape))
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    tau = float(np.exp(rng.uniform(-2, 0.5)))  # learned temperatures drift from 1/sqrt(d)
    got = kernels.router_attention_ref(q, k, v, tau, lib=ref_lib)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, tau), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 64, 16), (2, 4, 33, 8)])
def test_reference_key_mask_matches_additive_bias(ref_lib, shape):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    b, _, t, _ = shape
    lengths = rng.integers(1, t + 1, size=b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.uint8)
    mask[-1] = 0  # an all-padding row: the finite bias shifts every logit alike, no NaN
    got = kernels.router_attention_ref(q, k, v, 0.3, mask, lib=ref_lib)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, numpy_attention(q, k, v, 0.3, mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[-1:], numpy_attention(q[-1:], k[-1:], v[-1:], 0.3), rtol=1e-5, atol=1e-6)


def test_reference_matches_torch_sdpa(ref_lib):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((4, 8, 64, 8), dtype=np.float32) for _ in range(3))
    tau = 0.41
    want = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), scale=tau).numpy()
    np.testing.assert_allclose(kernels.router_attention_ref(q, k, v, tau, lib=ref_lib), want, rtol=1e-4, atol=1e-5)


def test_reference_rejects_bad_input(ref_lib):
    z = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(InputError, match="share one"):
        kernels.router_attention_ref(z, z[:, :, :3], z, 1.0, lib=ref_lib)
    with pytest.raises(InputError, match="head_dim 129"):
        big = np.zeros((1, 1, 2, 129), np.float32)
        kernels.router_attention_ref(big, big, big, 1.0, lib=ref_lib)
    with pytest.raises(InputError, match="key_mask has shape"):
        kernels.router_attention_ref(z, z, z, 1.0, np.ones((1, 5)), lib=ref_lib)
    with pytest.raises(BackendError, match=r"1 \(invalid argument\)"):
        kernels.router_attention_ref(z, z, z, float("nan"), lib=ref_lib)


def test_missing_libraries_say_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("MOQE_ROUTER_ATTENTION_LIB", str(tmp_path / "nope.so"))
    monkeypatch.setenv("MOQE_ROUTER_ATTENTION_REF_LIB", str(tmp_path / "nope_ref.so"))
    with pytest.raises(BackendError, match=r"make -C kernels.*runs the router's ONNX graph without it"):
        kernels.load_router_attention()
    assert kernels.available() is False
    with pytest.raises(BackendError, match="make -C kernels ref"):
        kernels.load_reference()
    with pytest.raises(InputError, match="unknown kernel build target"):
        kernels.build("fast")
