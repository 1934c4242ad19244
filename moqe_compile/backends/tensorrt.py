"""TensorRT: strongly typed engines from the bundle's S8S8 Q/DQ graphs, with ONNX fallback.

``tensorrt`` is imported only when an engine is built or deserialized, so this module (and
the ``tensorrt`` entry of ``BACKENDS``) loads on machines without it. The Q/DQ graph
already carries the calibration (TensorRT 11 has no implicit INT8 calibration), so an
engine is built *strongly typed*: TensorRT keeps the graph's types instead of choosing
precisions itself.

Engines are bound to a GPU and a TensorRT version. Each one is recorded in the manifest
under ``experts[].variants.tensorrt.engines`` (:class:`EngineRecord`): the compute
capability and TensorRT version it was built with, and the builder's version- and
hardware-compatibility settings. :func:`check_engine` applies TensorRT's documented
portability rules to a record; :class:`TensorRTSession` runs the first engine that fits
this machine and otherwise warns, says why each engine was refused, and runs the expert's
ONNX graph instead (ONNX Runtime CUDA when onnxruntime-gpu is installed, else CPU).

None of this has run against a real TensorRT (it could not be installed; docs/limitations.md):
only the record keeping, the compatibility rules and the fallback are tested, on the CPU.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moqe_compile.errors import BackendError, BundleError, ConfigError, InputError

log = logging.getLogger(__name__)

HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")
_TRT_HW = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise BackendError("TensorRT's Python package is not installed (`pip install tensorrt`, 10.x or 11.x, on "
                           "a machine with an NVIDIA GPU): TensorRT engines cannot be built or run here.") from e
    return tensorrt


def _version(v: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", v)
    if not parts:
        raise InputError(f"unparseable version {v!r}.")
    return tuple(int(p) for p in parts[:3])


def _cc(v: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, tuple):
        return int(v[0]), int(v[1])
    m = re.fullmatch(r"(?:sm_?)?(\d+)\.(\d+)", str(v))
    if not m:
        raise InputError(f"compute capability {v!r}: expected 'major.minor', e.g. '9.0'.")
    return int(m[1]), int(m[2])


def engine_cache_key(compute_capability, tensorrt_version: str, hardware_compatibility: str = "none",
                     version_compatible: bool = False) -> str:
    """The file stem an engine is stored under: GPU compute capability + TensorRT version,
    plus the portability settings (two engines for one GPU and version may differ in them):
    ``sm90-trt10.14.1``, ``sm80-trt10.14.1-hw_ampere_plus-vc``."""
    if hardware_compatibility not in HARDWARE_COMPAT:
        raise InputError(f"hardware_compatibility {hardware_compatibility!r}; expected one of {HARDWARE_COMPAT}.")
    major, minor = _cc(compute_capability)
    key = f"sm{major}{minor}-trt{'.'.join(map(str, _version(tensorrt_version)))}"
    if hardware_compatibility != "none":
        key += f"-hw_{hardware_compatibility}"
    return key + ("-vc" if version_compatible else "")


@dataclass(frozen=True)
class EngineRecord:
    """One serialized engine as the manifest records it."""

    path: str  # bundle-relative
    compute_capability: str  # "9.0": the GPU it was built on
    tensorrt_version: str
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    strongly_typed: bool = True
    device_name: str = ""
    onnx_sha256: str = ""  # the Q/DQ graph it was built from
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 64
    built_at: str = ""

    def __post_init__(self):
        if self.hardware_compatibility not in HARDWARE_COMPAT:
            raise BundleError(f"engine {self.path!r}: hardware_compatibility {self.hardware_compatibility!r} is not "
                              f"one of {HARDWARE_COMPAT}.")
        _cc(self.compute_capability)
        _version(self.tensorrt_version)
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise BundleError(f"engine {self.path!r}: batch profile {self.min_batch}/{self.opt_batch}/"
                              f"{self.max_batch} is not min <= opt <= max.")

    @classmethod
    def from_dict(cls, d: dict) -> "EngineRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BundleError(f"engine record has unknown keys {unknown}; known: {sorted(known)}.")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        return engine_cache_key(self.compute_capability, self.tensorrt_version, self.hardware_compatibility,
                                self.version_compatible)


def check_engine(rec: EngineRecord, compute_capability, tensorrt_version: str) -> str | None:
    """Why ``rec`` cannot run on a GPU of ``compute_capability`` with TensorRT
    ``tensorrt_version``, or None if it can. TensorRT's rules: a plain engine needs the exact
    TensorRT version it was built with; a version-compatible one runs on that version or a
    later one of the same major (TensorRT 11 also accepts version-compatible 10.x engines).
    Without hardware compatibility an engine needs the GPU's compute capability (TensorRT
    may still reject another model of that capability at load, which also falls back);
    ``same_compute_capability`` likewise; ``ampere_plus`` runs on any sm_80 or newer GPU."""
    have_cc, want_cc = _cc(compute_capability), _cc(rec.compute_capability)
    have_v, built_v = _version(tensorrt_version), _version(rec.tensorrt_version)
    where = (f"built for sm_{want_cc[0]}{want_cc[1]} / TensorRT {rec.tensorrt_version} "
             f"(hardware compatibility {rec.hardware_compatibility}, "
             f"{'version-compatible' if rec.version_compatible else 'not version-compatible'}); "
             f"this machine has sm_{have_cc[0]}{have_cc[1]} / TensorRT {tensorrt_version}")
    if rec.version_compatible:
        same_major = have_v[0] == built_v[0]
        next_major = have_v[0] == built_v[0] + 1 and have_v[0] >= 11
        if have_v < built_v or not (same_major or next_major):
            return f"engine {rec.path!r} {where}: a version-compatible engine runs only on its TensorRT version or later"
    elif have_v != built_v:
        return f"engine {rec.path!r} {where}: TensorRT versions differ"
    if rec.hardware_compatibility == "ampere_plus":
        if have_cc < (8, 0):
            return f"engine {rec.path!r} {where}: ampere_plus engines need sm_80 or newer"
    elif have_cc != want_cc:
        return f"engine {rec.path!r} {where}: compute capabilities differ"
    return None


def select_engine(records: list[EngineRecord], compute_capability, tensorrt_version: str
                  ) -> tuple[EngineRecord | None, list[str]]:
    """The first record that fits (exact builds are listed first by :func:`add_engines`), and
    the reasons every other one was refused."""
    reasons = []
    for rec in records:
        why = check_engine(rec, compute_capability, tensorrt_version)
        if why is None:
            return rec, reasons
        reasons.append(why)
    return None, reasons


# building ------------------------------------------------------------------------------

def build_engine(onnx_path: Path, out_path: Path, *, min_batch: int = 1, opt_batch: int = 1, max_batch: int = 64,
                 hardware_compatibility: str = "none", version_compatible: bool = False,
                 workspace_mib: int = 2048, device=None) -> EngineRecord:
    """Build a strongly typed engine from a Q/DQ ONNX graph with a symbolic batch dimension;
    write it to ``out_path`` and return its record (``path`` = ``out_path``'s name; callers
    that store it in a bundle set the bundle-relative path). Needs TensorRT and a GPU."""
    trt = import_tensorrt()
    if hardware_compatibility not in HARDWARE_COMPAT:
        raise InputError(f"hardware_compatibility {hardware_compatibility!r}; expected one of {HARDWARE_COMPAT}.")
    if device is None:
        from moqe_compile.backends.cuda_device import CudaDevice

        device = CudaDevice()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    # 10.x builds weakly typed networks unless asked; 11.x networks are always strongly typed
    # and accept the flag as a no-op, so setting it wherever it exists is right for both
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    elif _version(trt.__version__)[0] < 11:
        raise BackendError(f"TensorRT {trt.__version__} cannot build strongly typed networks; use 10.x or 11.x.")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"TensorRT could not parse {str(onnx_path)!r}: {errs[:5]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, _TRT_HW[hardware_compatibility])
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        tail = tuple(t.shape)[1:]
        if any(d < 0 for d in tail):
            raise BackendError(f"{str(onnx_path)!r}: input {t.name!r} shape {tuple(t.shape)} is dynamic beyond batch.")
        profile.set_shape(t.name, (min_batch, *tail), (opt_batch, *tail), (max_batch, *tail))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT failed to build an engine from {str(onnx_path)!r} (see its log above).")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(bytes(plan))
    from moqe_compile.bundle.manifest import sha256_file

    return EngineRecord(path=out_path.name, compute_capability="%d.%d" % device.compute_capability,
                        tensorrt_version=trt.__version__, hardware_compatibility=hardware_compatibility,
                        version_compatible=version_compatible, strongly_typed=True,
                        device_name=device.name, onnx_sha256=sha256_file(Path(onnx_path)), min_batch=min_batch,
                        opt_batch=opt_batch, max_batch=max_batch,
                        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def engine_rel_path(expert: str, key: str) -> str:
    return f"experts/{expert}/tensorrt/{key}.engine"


def add_engines(bundle_dir: str | Path, built: dict[str, tuple[Path, EngineRecord]]) -> dict:
    """Move built engines into a bundle and record them: ``built`` maps expert name ->
    (engine file, record). Each file lands at ``experts/<name>/tensorrt/<key>.engine``, its
    record in ``experts[].variants.tensorrt.engines`` (replacing one with the same key; exact
    builds first), its hash in ``files``; ``manifest.json`` is replaced atomically. The bundle
    must have the ``tensorrt`` variant (built with ``[backends] targets`` naming it)."""
    from moqe_compile.bundle import read_bundle
    from moqe_compile.bundle.manifest import sha256_file

    b = read_bundle(bundle_dir, verify=True)
    manifest = b.manifest
    experts = {e["name"]: e for e in manifest["experts"]}
    for name, (src, rec) in built.items():
        if name not in experts:
            raise InputError(f"no expert {name!r} in the bundle; it has {sorted(experts)}.")
        variant = experts[name]["variants"].get("tensorrt")
        if variant is None:
            raise BundleError(f"expert {name!r} has no tensorrt (S8S8) variant: rebuild the bundle with "
                              f"[backends] targets including \"tensorrt\".")
        rel = engine_rel_path(name, rec.key)
        dst = b.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        rec = dataclasses.replace(rec, path=rel)
        kept = [r for r in variant.get("engines", []) if r["path"] != rel]
        kept.append(rec.to_dict())
        # exact builds before portable ones: select_engine takes the first that fits
        kept.sort(key=lambda r: (r["hardware_compatibility"] != "none", r["version_compatible"]))
        variant["engines"] = kept
        manifest["files"][rel] = {"sha256": sha256_file(dst), "size": dst.stat().st_size}
    tmp = b.root / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, b.root / "manifest.json")
    return manifest


def build_bundle_engines(bundle_dir: str | Path, *, max_batch: int = 64, opt_batch: int = 1,
                         hardware_compatibility: str = "none", version_compatible: bool = False) -> list[EngineRecord]:
    """Build one engine per expert from its ``tensorrt`` (S8S8 Q/DQ) graph on this GPU and add
    them to the bundle (:func:`add_engines`). Needs TensorRT and a GPU."""
    from moqe_compile.bundle import read_bundle

    b = read_bundle(bundle_dir, verify=True)
    built = {}
    for e in b.manifest["experts"]:
        v = e["variants"].get("tensorrt")
        if v is None:
            # the bundle is sound, it was built for other backends: the request does not fit it
            raise ConfigError(f"expert {e['name']!r} has no tensorrt variant; build the bundle with "
                              f"[backends] targets = [\"onnxruntime-cpu\", \"tensorrt\"].")
        out = b.root / f".{e['name']}.engine.partial"
        built[e["name"]] = (out, build_engine(b.root / v["path"], out, opt_batch=opt_batch, max_batch=max_batch,
                                              hardware_compatibility=hardware_compatibility,
                                              version_compatible=version_compatible))
    manifest = add_engines(bundle_dir, built)
    return [EngineRecord.from_dict(r) for e in manifest["experts"] for r in e["variants"]["tensorrt"]["engines"]]


# running -------------------------------------------------------------------------------

def _bundle_engine_records(name: str, onnx_path: Path) -> tuple[Path | None, list[EngineRecord]]:
    """The engines the bundle holding ``onnx_path`` records for expert ``name``."""
    for root in Path(onnx_path).resolve().parents:
        if (root / "manifest.json").is_file():
            manifest = json.loads((root / "manifest.json").read_text())
            for e in manifest.get("experts", []):
                if e.get("name") == name:
                    recs = e.get("variants", {}).get("tensorrt", {}).get("engines", [])
                    return root, [EngineRecord.from_dict(r) for r in recs]
            return root, []
    return None, []


def onnx_fallback(name: str, path: Path, intra_op_threads: int = 0, device=None):
    """The ONNX session an engine-less expert runs on: ONNX Runtime CUDA where onnxruntime-gpu
    and a GPU are present, else ONNX Runtime CPU."""
    from moqe_compile.backends.onnxruntime_cuda import OrtCudaSession, cuda_provider_available

    if cuda_provider_available():
        try:
            return OrtCudaSession(name, path, intra_op_threads, device=device)
        except BackendError as e:
            log.warning("%s: ONNX Runtime CUDA unavailable (%s); using ONNX Runtime CPU.", name, e)
    from moqe_compile.backends.onnxruntime_cpu import OrtCpuSession

    return OrtCpuSession(name, path, intra_op_threads)


class TensorRTSession:
    """An expert served by a TensorRT engine from its bundle, or by its ONNX graph when none
    fits (``fallback_reason`` says why; ``engine`` is the record in use, or None).

    ``engines``: records to choose from (default: the bundle's manifest entry for ``name``),
    with paths relative to ``root``. ``strict``: raise instead of falling back.
    """

    def __init__(self, name: str, path: Path, intra_op_threads: int = 0, *, engines: list[EngineRecord] | None = None,
                 root: Path | None = None, device=None, strict: bool = False, fallback=onnx_fallback):
        self.name, self.path = name, Path(path)
        self.engine: EngineRecord | None = None
        self.fallback_reason: str | None = None
        self._fallback = None
        if engines is None:
            root, engines = _bundle_engine_records(name, self.path)
        self.root = Path(root) if root is not None else self.path.parent
        reason = self._try_engine(engines, device)
        if reason is None:
            return
        if strict:
            raise BackendError(f"{name}: {reason}")
        self.fallback_reason = reason
        self._fallback = fallback(name, self.path, intra_op_threads, device)
        kind = getattr(self._fallback, "providers", ["CPUExecutionProvider"])[0]
        msg = f"{name}: no usable TensorRT engine ({reason}); running the ONNX graph on {kind} instead."
        if engines:  # a refused engine is news; an expert without engines (the router) is not
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.info(msg)

    def _try_engine(self, engines: list[EngineRecord], device) -> str | None:
        if not engines:
            return "the bundle records no TensorRT engine for it"
        try:
            trt = import_tensorrt()
        except BackendError as e:
            return str(e)
        try:
            if device is None:
                from moqe_compile.backends.cuda_device import CudaDevice

                device = CudaDevice()
        except BackendError as e:
            return f"no CUDA device ({e})"
        rec, reasons = select_engine(engines, device.compute_capability, trt.__version__)
        if rec is None:
            return "; ".join(reasons)
        try:
            self._load(trt, rec, device)
        except BackendError as e:
            return str(e)
        self.engine = rec
        return None

    def _load(self, trt, rec: EngineRecord, device) -> None:
        from moqe_compile.backends.cuda_device import Buffers

        from moqe_compile.bundle.manifest import safe_join

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        if rec.version_compatible:
            # a version-compatible plan embeds the lean runtime it was built with
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(safe_join(self.root, rec.path).read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT {trt.__version__} refused to deserialize {rec.path!r} (see its log).")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise BackendError(f"engine {rec.path!r} has inputs {ins} and outputs {outs}; expected one of each.")
        self._trt, self._engine = trt, engine
        self._context = engine.create_execution_context()
        self.input_name, self.output_name = ins[0], outs[0]
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(ins[0])))
        self.output_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(outs[0])))
        self.input_tail = tuple(engine.get_tensor_shape(ins[0]))[1:]
        self.device = device
        self.stream = device.stream()
        self.buffers = Buffers(device)
        self._lock = threading.Lock()

    @property
    def providers(self) -> list[str]:
        return ["TensorRT"] if self.engine else getattr(self._fallback, "providers", ["CPUExecutionProvider"])

    @property
    def lock(self) -> threading.Lock:
        return self._lock if self.engine else self._fallback.lock

    def enqueue(self, in_ptr: int, n: int, out_ptr: int) -> None:
        """Run on ``n`` samples at device ``in_ptr`` into ``out_ptr``, enqueued on :attr:`stream`."""
        if self.engine is None:
            return self._fallback.enqueue(in_ptr, n, out_ptr)
        if not self.engine.min_batch <= n <= self.engine.max_batch:
            raise InputError(f"{self.name}: batch {n} outside the engine's profile "
                             f"[{self.engine.min_batch}, {self.engine.max_batch}].")
        ctx = self._context
        ctx.set_input_shape(self.input_name, (n, *self.input_tail))
        ctx.set_tensor_address(self.input_name, in_ptr)
        ctx.set_tensor_address(self.output_name, out_ptr)
        if not ctx.execute_async_v3(self.stream):
            raise BackendError(f"{self.name}: TensorRT execute_async_v3 failed on batch {n}.")

    def output_shape(self, n: int) -> tuple[int, ...]:
        if self.engine is None:
            return (n, *self._fallback.output_tail)
        self._context.set_input_shape(self.input_name, (n, *self.input_tail))
        return tuple(self._context.get_tensor_shape(self.output_name))

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.engine is None:
            return self._fallback.run(x)
        n = len(x)
        with self._lock:
            out_shape = self.output_shape(n)
            host_in = self.buffers.host_array("in", self.input_dtype, x.shape)
            host_in[...] = x
            host_out = self.buffers.host_array("out", self.output_dtype, out_shape)
            d_in = self.buffers.device_ptr("in", host_in.nbytes)
            d_out = self.buffers.device_ptr("out", host_out.nbytes)
            self.device.copy(d_in, host_in.ctypes.data, host_in.nbytes, "h2d", self.stream)
            self.enqueue(d_in, n, d_out)
            self.device.copy(host_out.ctypes.data, d_out, host_out.nbytes, "d2h", self.stream)
            self.device.synchronize(self.stream)
            return host_out.astype(np.float32, copy=True)

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
        if self.engine is not None:
            with self._lock:
                self._context = self._engine = None
                self.buffers.close()
                self.device.destroy_stream(self.stream)


def main(argv=None) -> int:
    """``python -m moqe_compile.backends.tensorrt BUNDLE``: build this GPU's engines into BUNDLE."""
    import argparse

    ap = argparse.ArgumentParser(description="build TensorRT engines for a bundle's S8S8 experts on this GPU")
    ap.add_argument("bundle")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--opt-batch", type=int, default=1)
    ap.add_argument("--hardware-compatibility", default="none", choices=HARDWARE_COMPAT)
    ap.add_argument("--version-compatible", action="store_true")
    args = ap.parse_args(argv)
    from moqe_compile.errors import MoqeError

    try:
        recs = build_bundle_engines(args.bundle, max_batch=args.max_batch, opt_batch=args.opt_batch,
                                    hardware_compatibility=args.hardware_compatibility,
                                    version_compatible=args.version_compatible)
    except MoqeError as e:
        print(f"moqe-compile tensorrt: {e}")
        return e.exit_code
    for r in recs:
        print(f"{r.path}  sm {r.compute_capability}  TensorRT {r.tensorrt_version}  {r.device_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
