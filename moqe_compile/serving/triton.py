"""``export_triton``: a bundle as a Triton Inference Server model repository.

    REPO/<prefix>router/        onnxruntime_onnx   the router (absent when the bundle serves one expert)
    REPO/<prefix>expert_<name>/ onnxruntime_onnx   one per expert (tensorrt_plan where the bundle has engines)
    REPO/<name>/                python (BLS)       what clients call: routes, groups per expert, one async
                                                   request per expert, answers like moqe-serve

Every ``config.pbtxt`` is Triton's own ``ModelConfig`` protobuf
(``tritonclient.grpc.model_config_pb2``), filled field by field and printed with
``google.protobuf.text_format``, so a field Triton does not know fails here, not at server start.

TensorRT engines are read where ``backends.tensorrt.add_engines`` records them
(``experts[].variants.tensorrt.engines``). With ``KIND_GPU`` an expert with engines becomes a
``tensorrt_plan`` model holding every engine, one file per compute capability
(``cc_model_filenames``: Triton loads the file for the GPU it runs on); a portable
(``ampere_plus``) engine is also the default file for GPUs without an exact build. Triton does
not check the TensorRT version an engine was built with: the server's TensorRT must match
the record's ``tensorrt_version`` (``moqe-compile inspect`` shows it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moqe_compile.bundle import read_bundle
from moqe_compile.bundle.manifest import NAME_RULE, check_outside, is_safe_name, safe_join
from moqe_compile.bundle.writer import signals_held, with_user_permissions
from moqe_compile.errors import BackendError, BundleError, ConfigError, InputError

KINDS = ("KIND_CPU", "KIND_GPU")
_DTYPE = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
          "bytes": "TYPE_STRING"}
RUNTIME_FILES = {"moqe_dispatch.py": ("runtime", "dispatch.py"), "moqe_fallback.py": ("router", "fallback.py")}


def _protobuf():
    """(model_config_pb2, text_format), imported only when a repository is written or read."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise BackendError("Triton model configs are written with tritonclient's protobufs, which are not "
                           "installed: pip install 'moqe-compile[triton]'.") from e
    return model_config_pb2, text_format


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # TYPE_FP32, ...
    dims: tuple[int, ...]  # without the batch dimension (max_batch_size > 0)


def model_config(name: str, inputs: list[Tensor], outputs: list[Tensor], *, platform: str = "",
                 backend: str = "", max_batch_size: int = 64, instance_kind: str = "KIND_CPU",
                 instance_count: int = 1, max_queue_delay_us: int = 0, parameters: dict[str, str] | None = None,
                 cc_model_filenames: dict[str, str] | None = None, default_model_filename: str = ""):
    """Triton's ``ModelConfig`` message for one model of the repository."""
    pb, _ = _protobuf()
    cfg = pb.ModelConfig(name=name, platform=platform, backend=backend, max_batch_size=max_batch_size,
                         default_model_filename=default_model_filename)
    for field, tensors in ((cfg.input, inputs), (cfg.output, outputs)):
        for t in tensors:
            field.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=list(t.dims))
    cfg.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(instance_kind), count=instance_count)
    if max_queue_delay_us > 0:  # Triton's dynamic batcher merges requests for this long
        cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    for k, v in (parameters or {}).items():
        cfg.parameters[k].string_value = v
    cfg.cc_model_filenames.update(cc_model_filenames or {})
    return cfg


def render_config(cfg) -> str:
    """``config.pbtxt`` text of a ``ModelConfig`` message."""
    return _protobuf()[1].MessageToString(cfg)


def parse_config(text: str, where: str):
    """Parse config.pbtxt text into Triton's ModelConfig protobuf; ConfigError names the file."""
    pb, text_format = _protobuf()
    msg = pb.ModelConfig()
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
        for flag, value in (("--name", self.name), ("--prefix", self.prefix)):
            if value and not is_safe_name(value):  # both become directory names in the repository
                raise ConfigError(f"{flag} {value!r} is not allowed: it becomes Triton model and folder names, "
                                  f"which have {NAME_RULE}. Pass another {flag}.")
        if self.instance_kind not in KINDS:
            raise ConfigError(f"instance kind {self.instance_kind!r} must be one of {KINDS}.")
        for k in ("instances", "max_batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} = {getattr(self, k)} must be >= 1.")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us = {self.max_queue_delay_us} must be >= 0.")


def _dims(shape: list) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in shape[1:])


def _engine_plan(expert: dict, max_batch_size: int) -> tuple[dict[str, str], dict[str, str], str]:
    """({file in the version dir: bundle path}, cc_model_filenames, default_model_filename) of
    an expert's TensorRT engines; empty when the bundle records none."""
    records = expert["variants"].get("tensorrt", {}).get("engines", [])
    files, by_cc, default = {}, {}, ""
    for r in records:  # add_engines lists exact builds first: the first per compute capability wins
        if r["max_batch"] < max_batch_size:
            raise ConfigError(f"expert {expert['name']!r}: engine {r['path']!r} takes batches up to "
                              f"{r['max_batch']}, below max_batch_size {max_batch_size}; pass --max-batch "
                              f"{r['max_batch']} or rebuild the engine with a larger --trt-max-batch.")
        if r["compute_capability"] in by_cc:
            continue
        fname = Path(r["path"]).stem + ".plan"
        files[fname] = r["path"]
        by_cc[r["compute_capability"]] = fname
        if r["hardware_compatibility"] == "ampere_plus" and not default:
            default = fname
    return files, by_cc, default


def _expert_model(expert: dict, mname: str, io: tuple[Tensor, Tensor], opts: TritonExport, common: dict):
    engine_files, by_cc, default = _engine_plan(expert, opts.max_batch_size)
    if engine_files and opts.instance_kind == "KIND_GPU":
        return (model_config(mname, [io[0]], [io[1]], platform="tensorrt_plan", cc_model_filenames=by_cc,
                             default_model_filename=default, **common), engine_files)
    variants = expert["variants"]
    if opts.variant not in variants:
        raise ConfigError(f"expert {expert['name']!r} has no {opts.variant!r} graph (it has {sorted(variants)}); "
                          f"rebuild with that backend or pick another --variant.")
    return (model_config(mname, [io[0]], [io[1]], platform="onnxruntime_onnx", **common),
            {"model.onnx": variants[opts.variant]["path"]})


def _check_model_names(models: list) -> None:
    """Every model name is one safe directory name (the default --name is the bundle directory's
    name, and a long --prefix can push a name over the limit), and no two collide."""
    names = [m.name for m, _ in models]
    bad = next((n for n in names if not is_safe_name(n)), None)
    if bad is not None:
        raise ConfigError(f"Triton model name {bad!r} is not allowed: a model name has {NAME_RULE}. Pass --name "
                          "(the default is the bundle directory's name) or a shorter --prefix.")
    if len(set(names)) != len(names):
        raise ConfigError(f"model names collide: {names}; pass another --name or --prefix.")


def plan_models(manifest: dict, opts: TritonExport, bundle_name: str) -> list[tuple[object, dict[str, str]]]:
    """Every model of the repository: (ModelConfig message, {file in the version dir: source})
    where the source is a bundle-relative path, or ``pkg:<sub>/<file>`` for a copied runtime file."""
    io = manifest["io"]
    inp = Tensor(io["input"]["name"], _DTYPE[io["input"]["dtype"]], _dims(io["input"]["shape"]))
    out = Tensor(io["output"]["name"], _DTYPE[io["output"]["dtype"]], _dims(io["output"]["shape"]))
    common = dict(max_batch_size=opts.max_batch_size, instance_kind=opts.instance_kind,
                  instance_count=opts.instances)
    models = []
    expert_models = []
    for e in manifest["experts"]:
        mname = f"{opts.prefix}expert_{e['name']}"
        expert_models.append(mname)
        models.append(_expert_model(e, mname, (inp, out), opts, common))
    routing = manifest["routing"]
    names = [e["name"] for e in manifest["experts"]]
    router_model = None
    r = manifest.get("router") or {}
    if routing["enabled"]:
        router_model = f"{opts.prefix}router"
        models.append((model_config(router_model, [Tensor(r["input"], inp.data_type, inp.dims)],
                                    [Tensor(r["output"], "TYPE_FP32", (len(names),))], platform="onnxruntime_onnx",
                                    **common), {"model.onnx": r["path"]}))
    params = {
        "router_model": router_model, "router_output": r.get("output"), "expert_models": expert_models,
        "expert_names": names, "default_expert": names.index(routing["default_expert"]),
        "fallback_threshold": float(routing.get("fallback_threshold", 0.0)),
        "fallback_expert": names.index(routing.get("fallback_expert", routing["default_expert"])),
        "input_name": inp.name, "output_name": out.name,
    }
    bls = model_config(
        opts.name or bundle_name, [Tensor("input", inp.data_type, inp.dims)],
        [Tensor("logits", out.data_type, out.dims), Tensor("expert", "TYPE_INT32", (1,)),
         Tensor("expert_name", "TYPE_STRING", (1,)), Tensor("router_confidence", "TYPE_FP32", (1,))],
        backend="python", max_queue_delay_us=opts.max_queue_delay_us,
        parameters={"moqe": json.dumps(params)}, **{**common, "instance_kind": "KIND_CPU"})
    files = {"model.py": "pkg:serving/triton_bls/model.py",
             **{dst: f"pkg:{sub}/{src}" for dst, (sub, src) in RUNTIME_FILES.items()}}
    models.append((bls, files))
    _check_model_names(models)
    return models


def _output_dir(bundle_root: Path, out: str | Path, overwrite: bool) -> Path:
    """``out`` resolved, refused where writing it would touch the bundle: inside it (as
    ``eval --out``), or holding it while --force would replace it."""
    out, root = check_outside(bundle_root, out, "-o"), bundle_root.resolve()
    if overwrite and root.is_relative_to(out):
        raise InputError(f"-o {str(out)!r} holds the bundle {str(root)!r}; --force would delete it. "
                         "Choose a directory that does not contain the bundle.")
    _refuse_existing(out, overwrite)  # before anything is copied
    return out


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"{str(out)!r} is a file; choose a directory for the repository (or --force to "
                          "replace the file).")
    if any(out.iterdir()):
        raise BundleError(f"{str(out)!r} exists and is not empty; pass --force to replace it.")


def _write_models(tmp: Path, models: list, bundle) -> None:
    """Each model's folder in ``tmp``; every path written is checked to stay inside ``tmp`` (the
    names were checked already: this holds even if a name slips past that)."""
    pkg = Path(__file__).resolve().parents[1]

    def target(rel: str) -> Path:
        return safe_join(tmp, rel, what="Triton repository path", inside="the output folder")

    for cfg, files in models:
        target(f"{cfg.name}/1").mkdir(parents=True)
        target(f"{cfg.name}/config.pbtxt").write_text(render_config(cfg))
        for dst, src in files.items():
            shutil.copyfile(pkg / src[4:] if src.startswith("pkg:") else bundle.file(src),
                            target(f"{cfg.name}/1/{dst}"))


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    with signals_held():  # stopped between the renames, -o would hold no repository
        if out.exists():
            _refuse_existing(out, overwrite)  # again: it may have changed while the models were copied
            old = out.with_name(f".{out.name}.old")
            _remove(old)
            out.rename(old)
        tmp.rename(out)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    """Best effort, as before: the new repository is in place when the old one goes."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def export_triton(bundle: str | Path, out: str | Path, opts: TritonExport | None = None,
                  overwrite: bool = False) -> Path:
    """Write the repository for ``bundle`` to ``out`` (atomically: a temp dir renamed into
    place; with ``overwrite`` an existing ``out`` is replaced only after the new one is
    complete and valid)."""
    opts = opts or TritonExport()
    opts.check()
    from moqe_compile.serving.server import check_servable

    b = read_bundle(bundle)
    check_servable(b.root)  # the BLS model decodes image tensors: a causal-LM bundle has no codec
    out = _output_dir(b.root, out, overwrite)
    models = plan_models(b.manifest, opts, b.root.resolve().name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    with_user_permissions(tmp)
    try:
        _write_models(tmp, models, b)
        _replace(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
