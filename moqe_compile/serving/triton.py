"""``export_triton``: a bundle as a Triton Inference Server model repository.

    REPO/<prefix>router/        onnxruntime_onnx   the router (absent when the bundle serves one expert)
    REPO/<prefix>expert_<name>/ onnxruntime_onnx   one per expert (tensorrt_plan where the bundle has an engine)
    REPO/<name>/                python (BLS)       what clients call: routes, groups per expert, one async
                                                   request per expert, answers like moqe-serve

``config.pbtxt`` files are generated from the dataclasses below and every one is parsed
back into Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``)
before the repository is moved into place, so a field Triton does not know fails here,
not at server start.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from moqe_compile.bundle import read_bundle
from moqe_compile.errors import BundleError, ConfigError

KINDS = ("KIND_CPU", "KIND_GPU")
_DTYPE = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
          "bytes": "TYPE_STRING"}
RUNTIME_FILES = {"moqe_dispatch.py": ("runtime", "dispatch.py"), "moqe_fallback.py": ("router", "fallback.py")}


@dataclass
class TensorConfig:
    name: str
    data_type: str  # TYPE_FP32, ...
    dims: list[int]  # without the batch dimension (max_batch_size > 0)

    def pbtxt(self) -> str:
        return f'{{ name: "{self.name}" data_type: {self.data_type} dims: [ {", ".join(map(str, self.dims))} ] }}'


@dataclass
class ModelConfig:
    """The subset of Triton's ModelConfig the exporter writes."""

    name: str
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    platform: str = ""  # onnxruntime_onnx | tensorrt_plan
    backend: str = ""  # python
    max_batch_size: int = 64
    instance_kind: str = "KIND_CPU"
    instance_count: int = 1
    max_queue_delay_us: int = 0  # > 0: Triton's dynamic batcher merges requests for this long
    parameters: dict[str, str] = field(default_factory=dict)

    def pbtxt(self) -> str:
        lines = [f'name: "{self.name}"']
        if self.platform:
            lines.append(f'platform: "{self.platform}"')
        if self.backend:
            lines.append(f'backend: "{self.backend}"')
        lines.append(f"max_batch_size: {self.max_batch_size}")
        lines.append("input [ " + ", ".join(t.pbtxt() for t in self.inputs) + " ]")
        lines.append("output [ " + ", ".join(t.pbtxt() for t in self.outputs) + " ]")
        lines.append(f"instance_group [ {{ kind: {self.instance_kind} count: {self.instance_count} }} ]")
        if self.max_queue_delay_us > 0:
            lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {self.max_queue_delay_us} }}")
        for k, v in self.parameters.items():
            lines.append(f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}")
        return "\n".join(lines) + "\n"


def parse_config(text: str, where: str):
    """Parse config.pbtxt text into Triton's ModelConfig protobuf; ConfigError names the file."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ConfigError("validating Triton configs needs tritonclient[grpc]: "
                          "pip install 'moqe-compile[triton]'.") from e
    msg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        raise ConfigError(f"{where}: not a valid Triton ModelConfig: {e}") from None
    return msg


@dataclass(frozen=True)
class TritonExport:
    """Options of ``moqe-compile export-triton``."""

    name: str = ""  # the BLS model's name; default: the bundle directory's name
    prefix: str = ""  # prefix of the router/expert model names (several bundles in one repository)
    variant: str = "onnxruntime-cpu"  # which expert graph: onnxruntime-cpu (U8S8) or tensorrt (S8S8, for GPUs)
    instance_kind: str = "KIND_CPU"
    instances: int = 1
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000

    def check(self) -> None:
        if self.instance_kind not in KINDS:
            raise ConfigError(f"instance kind {self.instance_kind!r} must be one of {KINDS}.")
        for k in ("instances", "max_batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} = {getattr(self, k)} must be >= 1.")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us = {self.max_queue_delay_us} must be >= 0.")


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


def plan_models(manifest: dict, opts: TritonExport, bundle_name: str) -> list[tuple[ModelConfig, dict[str, str]]]:
    """Every model of the repository: (config, {file in the version dir: source}) where the
    source is a bundle-relative path, or ``pkg:<sub>/<file>`` for a copied runtime file."""
    io = manifest["io"]
    inp = TensorConfig(io["input"]["name"], _DTYPE[io["input"]["dtype"]], _dims(io["input"]["shape"]))
    out = TensorConfig(io["output"]["name"], _DTYPE[io["output"]["dtype"]], _dims(io["output"]["shape"]))
    common = dict(max_batch_size=opts.max_batch_size, instance_kind=opts.instance_kind,
                  instance_count=opts.instances)
    models: list[tuple[ModelConfig, dict[str, str]]] = []
    engines = manifest.get("engines") or {}
    expert_models = []
    for e in manifest["experts"]:
        mname = f"{opts.prefix}expert_{e['name']}"
        expert_models.append(mname)
        engine = engines.get(e["name"])
        if engine is not None and opts.instance_kind == "KIND_GPU":
            models.append((ModelConfig(mname, [inp], [out], platform="tensorrt_plan", **common),
                           {"model.plan": engine["path"]}))
            continue
        variants = e["variants"]
        if opts.variant not in variants:
            raise ConfigError(f"expert {e['name']!r} has no {opts.variant!r} graph (it has {sorted(variants)}); "
                              f"rebuild with that backend or pick another --variant.")
        models.append((ModelConfig(mname, [inp], [out], platform="onnxruntime_onnx", **common),
                       {"model.onnx": variants[opts.variant]["path"]}))
    routing = manifest["routing"]
    names = [e["name"] for e in manifest["experts"]]
    router_model = None
    r = manifest.get("router") or {}
    if routing["enabled"]:
        router_model = f"{opts.prefix}router"
        k = len(names)
        models.append((ModelConfig(router_model, [TensorConfig(r["input"], inp.data_type, inp.dims)],
                                   [TensorConfig(r["output"], "TYPE_FP32", [k])], platform="onnxruntime_onnx",
                                   **common), {"model.onnx": r["path"]}))
    params = {
        "router_model": router_model, "router_output": r.get("output"), "expert_models": expert_models,
        "expert_names": names, "default_expert": names.index(routing["default_expert"]),
        "fallback_threshold": float(routing.get("fallback_threshold", 0.0)),
        "fallback_expert": names.index(routing.get("fallback_expert", routing["default_expert"])),
        "input_name": inp.name, "output_name": out.name,
    }
    bls = ModelConfig(
        opts.name or bundle_name, [TensorConfig("input", inp.data_type, inp.dims)],
        [TensorConfig("logits", out.data_type, out.dims), TensorConfig("expert", "TYPE_INT32", [1]),
         TensorConfig("expert_name", "TYPE_STRING", [1]), TensorConfig("router_confidence", "TYPE_FP32", [1])],
        backend="python", max_queue_delay_us=opts.max_queue_delay_us,
        parameters={"moqe": json.dumps(params)}, **{**common, "instance_kind": "KIND_CPU"})
    files = {"model.py": "pkg:serving/triton_bls/model.py",
             **{dst: f"pkg:{sub}/{src}" for dst, (sub, src) in RUNTIME_FILES.items()}}
    models.append((bls, files))
    return models


def export_triton(bundle: str | Path, out: str | Path, opts: TritonExport | None = None,
                  overwrite: bool = False) -> Path:
    """Write the repository for ``bundle`` to ``out`` (atomically: a temp dir renamed into
    place; with ``overwrite`` an existing ``out`` is replaced only after the new one is
    complete and valid)."""
    opts = opts or TritonExport()
    opts.check()
    b = read_bundle(bundle)
    out = Path(out).resolve()
    pkg = Path(__file__).resolve().parents[1]
    models = plan_models(b.manifest, opts, b.root.name)
    seen = [m.name for m, _ in models]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"model names collide: {seen}; pass another --name or --prefix.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for cfg, files in models:
            d = tmp / cfg.name
            (d / "1").mkdir(parents=True)
            text = cfg.pbtxt()
            parse_config(text, f"{cfg.name}/config.pbtxt")
            (d / "config.pbtxt").write_text(text)
            for dst, src in files.items():
                shutil.copyfile(pkg / src[4:] if src.startswith("pkg:") else b.file(src), d / "1" / dst)
        old = None
        if out.exists():
            if not overwrite and (not out.is_dir() or any(out.iterdir())):
                raise BundleError(f"{str(out)!r} exists and is not empty; pass --force to replace it.")
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
