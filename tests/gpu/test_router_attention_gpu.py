"""The CUDA router-attention kernel against the C reference on random inputs, on the GPU
(skipped without one: the shared ``gpu`` marker in tests/conftest.py). Inputs come from a
fixed seed, so a failure reproduces; ``MOQE_TEST_SEED=<n>`` draws other inputs, and every
failure message names the seed it ran with."""

from __future__ import annotations

import os

import numpy as np
import pytest

from moqe_compile.backends import kernels

pytestmark = pytest.mark.gpu

SEED = int(os.environ.get("MOQE_TEST_SEED", "0"))


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """Prebuilt libraries where $MOQE_ROUTER_ATTENTION_LIB / _REF_LIB name them (bench/gpu/check.sh
    builds them once), else a fresh build."""
    d = tmp_path_factory.mktemp("kbuild")
    lib = os.environ.get("MOQE_ROUTER_ATTENTION_LIB") or kernels.build("all", d)
    ref = os.environ.get("MOQE_ROUTER_ATTENTION_REF_LIB") or kernels.build("ref", d)
    return kernels.load_router_attention(lib), kernels.load_reference(ref)


# CV router shape at batch 1/64, NLP shapes (4 heads, head_dim up to 128, seq up to 512),
# and sizes off every fast path (seq not a multiple of the tile, head_dim 24)
SHAPES = [(1, 8, 64, 8), (64, 8, 64, 8), (3, 8, 50, 8), (2, 4, 130, 16), (2, 4, 77, 32), (2, 4, 512, 64),
          (1, 4, 512, 128), (2, 4, 33, 24)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(libs, shape, masked, dtype):
    import torch

    cuda, ref = libs
    rng = np.random.default_rng([SEED, *shape, masked, dtype == "float16"])
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    if dtype == "float16":  # the reference sees exactly the values the kernel reads
        q, k, v = (a.astype(np.float16).astype(np.float32) for a in (q, k, v))
    b, _, t, d = shape
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, size=(b, 1))).astype(np.uint8) if masked else None
    tau = float(np.exp(rng.uniform(-2.5, 0.0)))
    want = kernels.router_attention_ref(q, k, v, tau, mask, lib=ref)
    tdt = getattr(torch, dtype)
    tq, tk, tv = (torch.from_numpy(a).to("cuda", tdt) for a in (q, k, v))
    tm = None if mask is None else torch.from_numpy(mask).cuda()
    versions = [1, 2] if d in (8, 16, 32) else [1]
    tol = 1e-4 if dtype == "float32" else 1e-2  # fp16 output rounding: |y| <~ 4, half-ulp 2e-3
    for version in versions:
        got = kernels.router_attention_torch(tq, tk, tv, tau, tm, version=version, lib=cuda)
        torch.cuda.synchronize()
        err = np.abs(got.float().cpu().numpy() - want).max()
        assert err <= tol, f"version {version}: max abs error {err:.2e} > {tol} (MOQE_TEST_SEED={SEED})"


def test_kernel_runs_on_a_side_stream_and_matches_sdpa(libs):
    import torch

    cuda, _ = libs
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    q, k, v = (torch.randn(1024, 8, 64, 8, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = kernels.router_attention_torch(q, k, v, 0.3, lib=cuda)
    s.synchronize()
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3)
    assert (got.float() - want).abs().max().item() <= 1e-2, f"MOQE_TEST_SEED={SEED}"
