"""ONNX Runtime CUDA session: IOBinding on reused device buffers, one CUDA stream per session.

Needs ``onnxruntime-gpu`` (in place of the CPU ``onnxruntime`` wheel: both provide the
``onnxruntime`` module) and cuda-python. Each session owns a non-blocking stream that ONNX
Runtime computes on (``user_compute_stream``), so several experts' sessions overlap on one
GPU; :meth:`enqueue` binds device pointers and returns without a host sync
(``disable_synchronize_execution_providers``), and the caller syncs once per batch
(``tasks/image/runtime_gpu.py``). :meth:`run` is the plain ``Session`` contract (host array in, host
array out, one sync) so the CPU ``Runtime`` and the benches can use it too.

What this backend is for (docs/design.md#gpu-backends): ONNX Runtime's CUDA provider has no
integer convolutions. It runs a Q/DQ graph as float Conv between activation Q/DQ pairs (weights
folded, :func:`fold_constant_dequantize`), slower than FP32
(docs/results.md#gpu-router-attention-kernel-and-moqe-on-onnx-runtime-cuda), so an INT8 expert
on this backend is judged on correctness and on MoQE's overhead over one expert, never on
speed; :func:`fp16_model` makes the FP16 graph that reports put beside it.

CUDA graphs (``cuda_graph=True``): ONNX Runtime's own capture (provider option
``enable_cuda_graph``), one graph per batch size through the run option ``gpu_graph_id``
(1, 2, ...; -1 runs without a graph). A graph replays the device addresses it was captured
with, so graphs are keyed by (batch size, input address, output address): a replay always
reads and writes the buffers bound now, and callers that want replays rather than new
captures bind fixed buffers per batch size (``tasks/image/runtime_gpu.py`` does). At most
``max_graphs`` are captured; later keys run without a graph. Where the provider refuses
capture (a node left on the CPU, say) the session is made without it and
:attr:`graph_error` says why.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from moqe_compile.errors import BackendError, InputError
from moqe_compile.backends.cuda_device import Buffers

log = logging.getLogger(__name__)
CUDA_EP = "CUDAExecutionProvider"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return CUDA_EP in ort.get_available_providers()


_preloaded = False


def require_cuda_provider() -> None:
    global _preloaded
    import onnxruntime as ort

    if CUDA_EP in ort.get_available_providers() and not _preloaded and hasattr(ort, "preload_dlls"):
        # CUDA/cuDNN from the nvidia-* pip packages (as torch installs them) are not on the
        # loader's path; onnxruntime-gpu >= 1.21 can load them itself
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - best effort: system libraries may serve
            log.info("onnxruntime.preload_dlls() failed (%s); relying on system CUDA libraries.", e)
        _preloaded = True
    if CUDA_EP not in ort.get_available_providers():
        raise BackendError(
            f"onnxruntime {ort.__version__} has no {CUDA_EP} (providers: {ort.get_available_providers()}): "
            f"install onnxruntime-gpu in place of the CPU wheel (`pip uninstall onnxruntime && pip install "
            f"onnxruntime-gpu`: both provide the onnxruntime module) on a machine with an NVIDIA GPU.")


class OrtCudaSession:
    """One ONNX graph on the CUDA execution provider, with its own stream and buffers.

    ``device``: a :class:`~moqe_compile.backends.cuda_device.CudaDevice` (shared by the
    sessions of one runtime; created here when omitted). ``providers`` / ``device_type``
    exist so the binding logic runs under the CPU provider with a host-memory device in
    the CPU tests; production leaves them alone.
    """

    accepts_graph = True  # GpuRuntime hands it verified bytes (bundle.reader.Graph), not a path

    def __init__(self, name: str, path, intra_op_threads: int = 0, *, device=None,
                 provider_options: dict | None = None, providers: list[str] | None = None,
                 device_type: str = "cuda", cuda_graph: bool = False, max_graphs: int = 8,
                 fold_dequantize: bool = True):
        """``path``: an ONNX file, or a :class:`~moqe_compile.bundle.reader.Graph` whose bytes
        were verified against the manifest (a bundle's graphs are never re-opened by path)."""
        import onnx
        import onnxruntime as ort

        self.name = name
        if providers is None:
            require_cuda_provider()
        if device is None:
            from moqe_compile.backends.cuda_device import CudaDevice

            device = CudaDevice()
        self.device = device
        self.device_type = device_type
        self.stream = device.stream()
        self.buffers = Buffers(device)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads:
            so.intra_op_num_threads = intra_op_threads
        self.cuda_graph, self.graph_error, self.max_graphs = bool(cuda_graph), None, int(max_graphs)
        if providers is None:
            opts = {"device_id": str(device.device_id), "user_compute_stream": str(self.stream),
                    # ORT versions before 1.16 read this key instead of inferring it
                    "has_user_compute_stream": "1"}
            opts.update({k: str(v) for k, v in (provider_options or {}).items()})
            if self.cuda_graph:
                opts["enable_cuda_graph"] = "1"
            providers = [(CUDA_EP, opts), "CPUExecutionProvider"]
        graph = path if hasattr(path, "model") else None  # a verified bundle graph
        model: str | bytes = graph.model if graph is not None else str(path)
        if graph is not None:
            graph.configure(so)
            path = graph.rel
        self.folded = 0
        # folding needs every initializer in the proto: not for graphs with external data
        if fold_dequantize and not (graph is not None and (graph.external or graph.shared)):
            proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
            proto, self.folded = fold_constant_dequantize(proto)
            if self.folded:
                model = proto.SerializeToString()
                # Measured on the H200 (ORT 1.31.1): any optimization level above DISABLE_ALL
                # turns the folded float biases back into int32 DQs, which the CUDA provider
                # runs on the CPU (refusing graph capture) and which change the logits; without
                # graphs DISABLE_ALL ran as fast (2.01 vs 2.07 ms, MobileNetV2 Q/DQ, batch 1).
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self._sess = ort.InferenceSession(model, so, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            if not self.cuda_graph or not isinstance(providers[0], tuple):
                raise BackendError(f"{name}: ONNX Runtime (CUDA) could not load {str(path)!r}: {e}") from e
            # capture refused (e.g. a node ORT keeps on the CPU): serve without graphs, say why
            self.cuda_graph, self.graph_error = False, str(e).strip().splitlines()[-1][:300]
            log.warning("%s: CUDA graphs refused by ONNX Runtime (%s); running without them.", name,
                        self.graph_error)
            providers = [(CUDA_EP, {k: v for k, v in providers[0][1].items() if k != "enable_cuda_graph"}),
                         "CPUExecutionProvider"]
            try:
                self._sess = ort.InferenceSession(model, so, providers=providers)
            except Exception as e2:  # noqa: BLE001
                raise BackendError(f"{name}: ONNX Runtime (CUDA) could not load {str(path)!r}: {e2}") from e2
        self.providers = self._sess.get_providers()
        inp, out = self._sess.get_inputs()[0], self._sess.get_outputs()[0]
        for what, t in (("input", inp), ("output", out)):
            if t.type not in _ORT_TYPES:
                raise BackendError(f"{name}: {what} {t.name!r} has type {t.type}; expected float or float16.")
            if any(not isinstance(d, int) for d in t.shape[1:]):
                raise BackendError(f"{name}: {what} {t.name!r} shape {t.shape} is symbolic beyond the batch dim.")
        self.input_name, self.output_name = inp.name, out.name
        self.input_dtype, self.output_dtype = _ORT_TYPES[inp.type], _ORT_TYPES[out.type]
        self.input_tail, self.output_tail = tuple(inp.shape[1:]), tuple(out.shape[1:])
        self._ort = ort
        self._run_options = self._make_run_options(-1 if self.cuda_graph else None)
        self._graphs: dict[tuple[int, int, int], int] = {}  # (batch size, in_ptr, out_ptr) -> graph id
        self._graph_sizes: set[int] = set()  # the batch sizes among those keys (asked on every run)
        self._graph_options: dict[int, object] = {}
        self._io = self._sess.io_binding()
        self._bound: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def _make_run_options(self, graph_id: int | None):
        ro = self._ort.RunOptions()
        # return once the work is enqueued on our stream; the caller syncs once per batch
        ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if graph_id is not None:
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        return ro

    def wants_graph(self, n: int) -> bool:
        """Whether runs of ``n`` samples are worth fixed buffers: graphs are on and ``n``
        already has one or a slot is free (at most :attr:`max_graphs`)."""
        return self.cuda_graph and (n in self._graph_sizes or len(self._graphs) < self.max_graphs)

    @property
    def graph_sizes(self) -> list[int]:
        return sorted(self._graph_sizes)

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def input_nbytes(self, n: int) -> int:
        return n * int(np.prod(self.input_tail)) * np.dtype(self.input_dtype).itemsize

    def output_nbytes(self, n: int) -> int:
        return n * int(np.prod(self.output_tail)) * np.dtype(self.output_dtype).itemsize

    def enqueue(self, in_ptr: int, n: int, out_ptr: int, graph: bool = False) -> None:
        """Run on ``n`` samples already on the device at ``in_ptr`` into ``out_ptr``; returns
        when the work is enqueued on :attr:`stream`. Callers hold :attr:`lock` (one binding).

        ``graph=True`` (with ``cuda_graph`` on): capture, then replay, the CUDA graph of
        (``n``, ``in_ptr``, ``out_ptr``) while fewer than :attr:`max_graphs` exist; else run
        without one."""
        run_options = self._run_options
        if graph and self.cuda_graph:
            key = (n, in_ptr, out_ptr)
            gid = self._graphs.get(key)
            if gid is None and len(self._graphs) < self.max_graphs:
                gid = self._graphs[key] = len(self._graphs) + 1
                self._graph_sizes.add(n)
            if gid is not None:
                run_options = self._graph_options.get(gid)
                if run_options is None:
                    run_options = self._graph_options[gid] = self._make_run_options(gid)
        io = self._io
        if self._bound != (n, in_ptr, out_ptr):  # the binding outlives the run: rebind on change only
            io.bind_input(self.input_name, self.device_type, self.device.device_id, self.input_dtype,
                          [n, *self.input_tail], in_ptr)
            io.bind_output(self.output_name, self.device_type, self.device.device_id, self.output_dtype,
                           [n, *self.output_tail], out_ptr)
            self._bound = (n, in_ptr, out_ptr)
        try:
            self._sess.run_with_iobinding(io, run_options)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"{self.name}: ONNX Runtime (CUDA) run failed on batch {n}: {e}") from e

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def run(self, x: np.ndarray) -> np.ndarray:
        """Host batch in, host output out: H2D, enqueue, D2H on this session's stream, one sync.
        Concurrent calls serialize on the session's lock (its buffers are reused)."""
        if x.ndim < 1 or tuple(x.shape[1:]) != self.input_tail:
            raise InputError(f"{self.name}: batch shape {x.shape}; expected (N, {', '.join(map(str, self.input_tail))}).")
        n = len(x)
        with self._lock:
            # a graphed batch size gets buffers of its own: its graph replays their addresses
            graph = self.wants_graph(n)
            sfx = f"@{n}" if graph else ""
            host_in = self.buffers.host_array("in" + sfx, self.input_dtype, x.shape)
            host_in[...] = x  # also converts float32 -> float16 for an FP16 graph
            d_in = self.buffers.device_ptr("in" + sfx, self.input_nbytes(n))
            d_out = self.buffers.device_ptr("out" + sfx, self.output_nbytes(n))
            host_out = self.buffers.host_array("out" + sfx, self.output_dtype, (n, *self.output_tail))
            self.device.copy(d_in, host_in.ctypes.data, self.input_nbytes(n), "h2d", self.stream)
            self.enqueue(d_in, n, d_out, graph=graph)
            self.device.copy(host_out.ctypes.data, d_out, self.output_nbytes(n), "d2h", self.stream)
            self.device.synchronize(self.stream)
            return host_out.astype(np.float32, copy=True)

    def close(self) -> None:
        with self._lock:
            self._sess = None
            self.buffers.close()
            self.device.destroy_stream(self.stream)


def fold_constant_dequantize(model):
    """Replace every DequantizeLinear whose inputs are all initializers (the Q/DQ graph's
    weights and int32 biases) by the float initializer it computes. Returns (model, count).

    For the CUDA provider only, and exact: it has no integer convolutions, so it would
    dequantize the same constants on every run, 106 extra kernels for MobileNetV2; worse, it
    has no DequantizeLinear for int32, so ONNX Runtime runs the bias DQs on the CPU, adds a
    host-to-device copy per bias (53 Memcpy nodes measured on the H200) and refuses CUDA-graph
    capture. Activation Q/DQ pairs stay: they are the expert's quantization. Written here
    because ONNX Runtime's optimizers keep weight DQs on purpose (the CPU provider fuses them
    into integer kernels) and onnx's own tools do not fold; numpy does the arithmetic."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep, folded, used = [], [], set()
    for node in g.node:
        names = [i for i in node.input if i]
        blocked = any(a.name == "block_size" and a.i for a in node.attribute)
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or blocked \
                or not all(i in inits for i in names):
            keep.append(node)
            continue
        x = numpy_helper.to_array(inits[names[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[names[1]])
        zp = numpy_helper.to_array(inits[names[2]]).astype(np.float64) if len(names) > 2 else 0.0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:  # per-axis: broadcast along `axis`
            shape = [1] * x.ndim
            shape[axis % x.ndim] = scale.size
            sc = scale.astype(np.float64).reshape(shape)
            zp = zp.reshape(shape) if np.ndim(zp) else zp
        else:
            sc = scale.astype(np.float64)
        value = ((x - zp) * sc).astype(scale.dtype)
        folded.append(numpy_helper.from_array(value, node.output[0]))
    if not folded:
        return model, 0
    for node in keep:
        used.update(node.input)
    used.update(o.name for o in g.output)
    out = helper.make_model(helper.make_graph(
        keep, g.name, list(g.input), list(g.output),
        [t for t in g.initializer if t.name in used] + folded, value_info=list(g.value_info)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return out, len(folded)


def fp16_model(fp32_path: Path, out_path: Path) -> Path:
    """The FP32 graph converted to FP16 with float32 inputs/outputs kept (ONNX Runtime's own
    converter): the baseline the INT8 Q/DQ experts are reported beside on the GPU."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return out_path
