"""TensorRT without TensorRT: engine cache keys, manifest records, TensorRT's portability
rules, refusal with a message and fallback to the ONNX graph. Building and running engines
needs TensorRT and a GPU and is not tested here."""

from __future__ import annotations

import importlib.util
import json
import types

import numpy as np
import onnx
import pytest

from moqe_compile.backends import OrtCpuSession, resolve_backend
from moqe_compile.backends import tensorrt as trtb
from moqe_compile.bundle import read_bundle
from moqe_compile.bundle.manifest import sha256_file
from moqe_compile.errors import BackendError, BundleError, InputError

from .fakes import HostDevice

rec = trtb.EngineRecord


def test_engine_cache_key_names_gpu_version_and_portability():
    assert trtb.engine_cache_key("9.0", "10.14.1.48") == "sm90-trt10.14.1"
    assert trtb.engine_cache_key((8, 6), "11.4.0", "ampere_plus", True) == "sm86-trt11.4.0-hw_ampere_plus-vc"
    assert rec("e", "9.0", "10.14.1", "same_compute_capability").key == "sm90-trt10.14.1-hw_same_compute_capability"
    with pytest.raises(InputError, match="hardware_compatibility 'any'"):
        trtb.engine_cache_key("9.0", "10.14.1", "any")
    with pytest.raises(InputError, match="compute capability 'hopper'"):
        trtb.engine_cache_key("hopper", "10.14.1")


@pytest.mark.parametrize("engine, cc, version, refused", [
    (rec("e", "9.0", "10.14.1"), "9.0", "10.14.1", None),
    (rec("e", "9.0", "10.14.1"), "9.0", "10.14.2", "TensorRT versions differ"),
    (rec("e", "8.6", "10.14.1"), "9.0", "10.14.1", "compute capabilities differ"),
    (rec("e", "9.0", "10.14.1", version_compatible=True), "9.0", "10.16.0", None),
    (rec("e", "9.0", "10.14.1", version_compatible=True), "9.0", "10.3.0", "its TensorRT version or later"),
    (rec("e", "9.0", "10.14.1", version_compatible=True), "9.0", "11.4.0", None),  # TRT 11 runs VC 10.x plans
    (rec("e", "9.0", "10.14.1", version_compatible=True), "9.0", "12.0.0", "its TensorRT version or later"),
    (rec("e", "8.0", "10.14.1", "ampere_plus"), "9.0", "10.14.1", None),
    (rec("e", "8.0", "10.14.1", "ampere_plus"), "7.5", "10.14.1", "need sm_80 or newer"),
    (rec("e", "9.0", "10.14.1", "same_compute_capability"), "8.9", "10.14.1", "compute capabilities differ"),
])
def test_check_engine_applies_tensorrt_portability_rules(engine, cc, version, refused):
    why = trtb.check_engine(engine, cc, version)
    if refused is None:
        assert why is None
    else:
        assert refused in why and f"TensorRT {version}" in why and f"TensorRT {engine.tensorrt_version}" in why


def test_select_engine_takes_the_first_fit_and_explains_the_rest():
    a, b = rec("a", "8.6", "10.14.1"), rec("b", "9.0", "10.14.1")
    chosen, reasons = trtb.select_engine([a, b], "9.0", "10.14.1")
    assert chosen is b and len(reasons) == 1 and "'a'" in reasons[0]
    assert trtb.select_engine([a], "9.0", "10.14.1")[0] is None


def test_engine_record_round_trip_and_validation():
    r = rec("experts/a/tensorrt/sm90-trt10.14.1.engine", "9.0", "10.14.1", max_batch=32, opt_batch=8)
    assert rec.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(BundleError, match=r"unknown keys \['gpu'\]"):
        rec.from_dict({**r.to_dict(), "gpu": "h100"})
    with pytest.raises(BundleError, match="min <= opt <= max"):
        rec("e", "9.0", "10.14.1", opt_batch=128, max_batch=64)
    with pytest.raises(BundleError, match="hardware_compatibility 'all'"):
        rec("e", "9.0", "10.14.1", "all")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks the message without TensorRT")
def test_lazy_import_says_what_to_install():
    with pytest.raises(BackendError, match=r"pip install tensorrt"):
        trtb.import_tensorrt()


@pytest.fixture
def trt_bundle(tmp_path, tiny_onnx):
    """A minimal bundle with one expert's tensorrt (S8S8) variant; the tiny FP graph stands in
    for it (only file bookkeeping and the ONNX fallback read it)."""
    root = tmp_path / "b"
    (root / "experts/a").mkdir(parents=True)
    onnx.save(onnx.load(str(tiny_onnx)), str(root / "experts/a/tensorrt.onnx"))  # self-contained, as in bundles
    rel = "experts/a/tensorrt.onnx"
    # a valid manifest (the reader checks it against the schema); "cpu_only" has no tensorrt
    # graph, so the bundle lists onnxruntime-cpu only and both experts have that graph
    manifest = {"schema_version": 1, "task": {"kind": "image-classification", "num_classes": 4},
                "model": {"fp": {"path": rel}},
                "preprocessing": {"resize": 32, "crop": 32, "mean": [0.0] * 3, "std": [1.0] * 3},
                "io": {"input": {"name": "input", "shape": ["batch", 3, 32, 32]},
                       "output": {"name": "logits", "shape": ["batch", 4]}},
                "experts": [{"name": "a", "variants": {"tensorrt": {"path": rel}, "onnxruntime-cpu": {"path": rel}}},
                            {"name": "cpu_only", "variants": {"onnxruntime-cpu": {"path": rel}}}],
                "router": {"path": rel}, "routing": {"enabled": False, "default_expert": "a"},
                "backends": ["onnxruntime-cpu"],
                "files": {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_add_engines_records_them_in_the_hash_checked_manifest(trt_bundle, tmp_path):
    made = []
    for cc, hw in (("8.0", "ampere_plus"), ("9.0", "none")):
        f = tmp_path / f"{cc}.plan"
        f.write_bytes(b"engine bytes " + cc.encode())
        made.append((f, rec(f.name, cc, "10.14.1", hw)))
    for f, r in made:
        trtb.add_engines(trt_bundle, {"a": (f, r)})
    b = read_bundle(trt_bundle, verify=True)  # every engine is hashed under `files`
    engines = b.manifest["experts"][0]["variants"]["tensorrt"]["engines"]
    assert [e["path"] for e in engines] == ["experts/a/tensorrt/sm90-trt10.14.1.engine",
                                            "experts/a/tensorrt/sm80-trt10.14.1-hw_ampere_plus.engine"]
    assert (trt_bundle / engines[0]["path"]).read_bytes() == b"engine bytes 9.0"
    # rebuilding for the same key replaces the record instead of adding a second one
    f = tmp_path / "again.plan"
    f.write_bytes(b"rebuilt")
    trtb.add_engines(trt_bundle, {"a": (f, rec("x", "9.0", "10.14.1"))})
    engines = read_bundle(trt_bundle).manifest["experts"][0]["variants"]["tensorrt"]["engines"]
    assert len(engines) == 2 and (trt_bundle / engines[0]["path"]).read_bytes() == b"rebuilt"
    with pytest.raises(BundleError, match="no tensorrt .S8S8. variant"):
        trtb.add_engines(trt_bundle, {"cpu_only": (f, rec("x", "9.0", "10.14.1"))})
    with pytest.raises(InputError, match="no expert 'z'"):
        trtb.add_engines(trt_bundle, {"z": (f, rec("x", "9.0", "10.14.1"))})


@pytest.fixture
def fake_trt(monkeypatch):
    monkeypatch.setattr(trtb, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.14.1.48"))


def test_engine_for_another_gpu_is_refused_with_a_message_and_the_onnx_graph_runs(trt_bundle, tmp_path, fake_trt):
    f = tmp_path / "plan"
    f.write_bytes(b"built on an A10")
    trtb.add_engines(trt_bundle, {"a": (f, rec("x", "8.6", "10.14.1", device_name="NVIDIA A10"))})
    onnx_path = trt_bundle / "experts/a/tensorrt.onnx"
    with pytest.warns(RuntimeWarning, match=r"sm_86 / TensorRT 10.14.1.*sm_90 / TensorRT 10.14.1.48.*"
                                            r"compute capabilities differ.*running the ONNX graph"):
        s = trtb.TensorRTSession("a", onnx_path, device=HostDevice())  # engines read from the manifest
    assert s.engine is None and "compute capabilities differ" in s.fallback_reason
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(s.run(x), OrtCpuSession("ref", onnx_path).run(x), rtol=1e-6)
    assert s.providers == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="compute capabilities differ"):
        trtb.TensorRTSession("a", onnx_path, device=HostDevice(), strict=True)


def test_engine_for_another_tensorrt_version_is_refused(trt_bundle, tmp_path, fake_trt):
    f = tmp_path / "plan"
    f.write_bytes(b"old")
    trtb.add_engines(trt_bundle, {"a": (f, rec("x", "9.0", "10.3.0"))})
    with pytest.warns(RuntimeWarning, match="TensorRT versions differ"):
        s = trtb.TensorRTSession("a", trt_bundle / "experts/a/tensorrt.onnx", device=HostDevice())
    assert s.engine is None


def test_no_engine_falls_back_quietly(trt_bundle, recwarn):
    # the router and engine-less bundles: no TensorRT engine is not a surprise worth a warning
    s = trtb.TensorRTSession("a", trt_bundle / "experts/a/tensorrt.onnx")
    assert s.engine is None and "records no TensorRT engine" in s.fallback_reason
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_auto_keeps_choosing_cpu_and_gpu_backends_are_named(monkeypatch):
    from moqe_compile.backends import cuda_device

    assert resolve_backend("auto", ["onnxruntime-cpu", "tensorrt"]) == "onnxruntime-cpu"
    monkeypatch.setattr(cuda_device, "gpu_visible", lambda: False)
    with pytest.raises(BackendError, match="tensorrt only on a machine with an NVIDIA GPU"):
        resolve_backend("auto", ["tensorrt"])
    monkeypatch.setattr(cuda_device, "gpu_visible", lambda: True)
    assert resolve_backend("auto", ["tensorrt"]) == "tensorrt"
    assert resolve_backend("auto", ["onnxruntime-cpu", "tensorrt"]) == "onnxruntime-cpu"
    assert resolve_backend("tensorrt", ["onnxruntime-cpu", "tensorrt"]) == "tensorrt"
    with pytest.raises(BackendError, match="GpuRuntime"):
        resolve_backend("onnxruntime-cuda", ["onnxruntime-cpu"])
