"""The GPU backends on a real GPU: ONNX Runtime CUDA sessions and ``GpuRuntime`` against the
CPU path, and TensorRT engines where TensorRT is installed. Skipped without a GPU (the
shared ``gpu`` marker); the ONNX Runtime parts also need onnxruntime-gpu."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

from moqe_compile.backends import OrtCpuSession

from ..models import class_batch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device():
    from moqe_compile.backends.cuda_device import CudaDevice

    return CudaDevice()


@pytest.fixture(scope="module")
def need_ort_cuda():
    from moqe_compile.backends.onnxruntime_cuda import cuda_provider_available

    if not cuda_provider_available():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")


def test_ort_cuda_session_matches_cpu(tiny_onnx, device, need_ort_cuda):
    from moqe_compile.backends.onnxruntime_cuda import OrtCudaSession

    s = OrtCudaSession("tiny", tiny_onnx, device=device)
    assert s.providers[0] == "CUDAExecutionProvider"
    ref = OrtCpuSession("ref", tiny_onnx)
    for n in (1, 7, 64, 3):
        x = np.random.default_rng(n).standard_normal((n, 3, 32, 32), dtype=np.float32)
        np.testing.assert_allclose(s.run(x), ref.run(x), rtol=1e-3, atol=1e-3)
    s.close()


def test_gpu_runtime_matches_cpu_runtime(tiny_bundle, device, need_ort_cuda):
    from moqe_compile import Runtime
    from moqe_compile.tasks.image.runtime_gpu import GpuRuntime

    x, _ = class_batch(33)
    with GpuRuntime.load(tiny_bundle, device=device) as g, Runtime.load(tiny_bundle) as cpu:
        assert set(g.describe()["sessions"].values()) == {"CUDAExecutionProvider"}
        got, want = g.run(x), cpu.run(x)
        # 0.05 is the fake-quant (float conv on the GPU) vs integer-kernel gap on logits of a
        # few units; it must still tell inputs apart (measured on CPU: rows differ by up to 4.6).
        assert not np.allclose(want.logits, np.roll(want.logits, 1, axis=0), rtol=0.05, atol=0.05)
        # float conv on the GPU vs integer kernels on the CPU: routing near a tie may differ
        assert (got.expert_index == want.expert_index).mean() >= 0.9
        same = got.expert_index == want.expert_index
        np.testing.assert_allclose(got.logits[same], want.logits[same], rtol=0.05, atol=0.05)
        one = GpuRuntime.load(tiny_bundle, device=device, only_expert=g.expert_names[0])
        np.testing.assert_allclose(one.run(x).logits, cpu.run_expert(g.expert_names[0], x), rtol=0.05, atol=0.05)
        one.close()


def test_cuda_graph_replays_match_the_plain_gpu_runtime(tiny_bundle, device, need_ort_cuda):
    from moqe_compile.tasks.image.runtime_gpu import GpuRuntime

    rng = np.random.default_rng(1)
    with GpuRuntime.load(tiny_bundle, device=device) as plain, \
            GpuRuntime.load(tiny_bundle, device=device, cuda_graph=True) as graphed:
        for n in (1, 8, 1, 8, 3, 8, 1):  # sizes return: replays, each on a fresh input
            x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
            want, got = plain.run(x), graphed.run(x)
            assert (got.expert_index == want.expert_index).all()
            np.testing.assert_allclose(got.logits, want.logits, rtol=1e-4, atol=1e-4)
        info = graphed.describe()["cuda_graphs"]
        assert not any(v.startswith("refused") for v in info.values()), info
        with GpuRuntime.load(tiny_bundle, device=device, cuda_graph=True, speculate_below=2) as spec:
            for n in (1, 2, 1, 5):
                x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
                want, got = plain.run(x), spec.run(x)
                assert (got.expert_index == want.expert_index).all()
                np.testing.assert_allclose(got.logits, want.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed")
def test_tensorrt_engine_builds_records_and_runs(tmp_path, tiny_onnx, device):
    from moqe_compile.backends import tensorrt as trtb
    from moqe_compile.bundle.manifest import sha256_file

    root = tmp_path / "b"
    (root / "experts/a").mkdir(parents=True)
    rel = "experts/a/tensorrt.onnx"
    onnx.save(onnx.load(str(tiny_onnx)), str(root / rel))
    manifest = {"schema_version": 1, "experts": [{"name": "a", "variants": {"tensorrt": {"path": rel}}}],
                "files": {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    rec = trtb.build_engine(root / rel, tmp_path / "a.plan", max_batch=16, device=device)
    trtb.add_engines(root, {"a": (tmp_path / "a.plan", rec)})
    s = trtb.TensorRTSession("a", root / rel, device=device)
    assert s.engine is not None and s.fallback_reason is None
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(s.run(x), OrtCpuSession("ref", root / rel).run(x), rtol=1e-2, atol=1e-2)
    s.close()
