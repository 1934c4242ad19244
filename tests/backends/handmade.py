"""A hand-made bundle (router = softmax of channel means, so the input decides the routing;
expert k = channel means times k + 1, so outputs show which expert ran) and the IOBinding
session factory that runs under the CPU provider with the host-memory device."""

from __future__ import annotations

import json

import onnx
from onnx import TensorProto, helper

from moqe_compile.backends.onnxruntime_cuda import OrtCudaSession
from moqe_compile.bundle.manifest import sha256_file

C, S, K = 3, 8, 3


def _graph(path, scale: float | None):
    """(N, 3, 8, 8) -> channel means (N, 3); times ``scale``, or softmax when None."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, S, S])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", K])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0)]
    inits = [axes]
    if scale is None:
        nodes.append(helper.make_node("Softmax", ["m"], ["y"], axis=-1))
    else:
        inits.append(helper.make_tensor("s", TensorProto.FLOAT, [], [scale]))
        nodes.append(helper.make_node("Mul", ["m", "s"], ["y"]))
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, str(path))


def make_bundle(root):
    names = ["e0", "e1", "e2"]
    files = {"router/router.onnx": None, "task/labels.json": None}
    (root / "router").mkdir(parents=True)
    (root / "task").mkdir()
    (root / "fp").mkdir()
    _graph(root / "router/router.onnx", None)
    (root / "task/labels.json").write_text(json.dumps(["a", "b", "c"]))
    experts = []
    for k, n in enumerate(names):
        (root / "experts" / n).mkdir(parents=True)
        variants = {}
        for b in ("onnxruntime-cpu", "tensorrt"):
            rel = f"experts/{n}/{b}.onnx"
            _graph(root / rel, float(k + 1))
            files[rel] = None
            variants[b] = {"path": rel}
        experts.append({"name": n, "variants": variants})
    _graph(root / "fp/model.onnx", 1.0)
    files["fp/model.onnx"] = None
    manifest = {"schema_version": 1, "model": {"fp": {"path": "fp/model.onnx"}}, "preprocessing": {"resize": S, "crop": S, "mean": [0.0] * C, "std": [1.0] * C},
                "task": {"labels": {"path": "task/labels.json"}}, "experts": experts,
                "router": {"path": "router/router.onnx"}, "backends": ["onnxruntime-cpu", "tensorrt"],
                "routing": {"enabled": True, "default_expert": "e1", "fallback_threshold": 0.0}}
    manifest["files"] = {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
                         for rel in files}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def host_factory(name, path, device):
    return OrtCudaSession(name, path, device=device, providers=["CPUExecutionProvider"], device_type="cpu")


