"""``GpuRuntime``: a bundle on one NVIDIA GPU, one CUDA stream and execution context per expert.

Per batch (docs/design.md#gpu-backends):

1. the batch goes to the device once (pinned host buffer -> device buffer);
2. the router runs on its own stream and its probabilities come back: **host sync 1**,
   because grouping samples per expert is a host decision (none without a router);
3. ``dispatch.group_by_expert`` (the very code ``Runtime``, Triton and Ray use) groups the
   samples; each expert's stream waits on an event for the input, gathers its samples
   device-to-device (no gather when one expert takes the whole batch, the common case),
   runs, and copies its logits back to a pinned buffer, all enqueued without waiting;
4. every expert stream records an event, one join stream waits on all of them, and the
   host syncs once on it: **host sync 2**, one for all experts; ``dispatch.scatter`` puts
   the outputs back in input order.

Sessions come from ``backends.GPU_BACKENDS``: ``onnxruntime-cuda`` (the bundle's Q/DQ
graphs on ONNX Runtime's CUDA provider, ``user_compute_stream`` = the expert's stream) or
``tensorrt`` (engines from the bundle, ONNX Runtime CUDA where none fits). Device buffers
are allocated for the largest batch seen and reused. ``run`` and ``submit`` are safe from
many threads; calls take turns (the buffers are shared), so use one runtime per concurrent
stream of batches. ``close`` drains and waits as ``runtime/base.py`` says.

``cuda_graph=True`` (ONNX Runtime CUDA only): each session captures and replays a CUDA
graph per (batch size, input buffer, output buffer), up to ``max_graphs`` of them (then it
runs without one). So that replays happen, every buffer a graphed session binds is keyed by
its batch size (``x@64``, ``y/2@17``) instead of being grown and moved; the router
always takes the whole batch, and an expert usually does, so serving at a few fixed batch
sizes stays on graphs. It cuts the host's per-node launch cost, which is most of a
MobileNetV2-sized model's time at batch 1.

``speculate_below=N`` (batches of at most N samples, N >= 1; off by default): every loaded
expert runs on the whole batch at once, on its own stream, *while* the router runs, and the
routed expert's rows are kept. Latency becomes the slowest of router and experts instead of
router + expert, at the price of K experts' GPU work for each such batch, which a big GPU
at batch 1 mostly has idle. The results are the routed path's exactly (same graphs, same
rows kept); it is a latency/compute trade, and reports name it. It hides little where MoQE's
overhead is host work (ORT run calls, syncs) rather than serial GPU time
(docs/results.md#gpu-router-attention-kernel-and-moqe-on-onnx-runtime-cuda).

Tested on the CPU with a host-memory device (tests/backends/fakes.py); the GPU runs are in
tests/gpu and bench/gpu/check.sh.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from moqe_compile.backends import GPU_BACKENDS
from moqe_compile.backends.cuda_device import Buffers
from moqe_compile.bundle import read_bundle
from moqe_compile.errors import BackendError, InputError
from moqe_compile.router.fallback import apply_fallback
from moqe_compile.runtime.base import QueueConfig, timing
from moqe_compile.runtime.dispatch import group_by_expert, scatter
from moqe_compile.tasks.image.runtime import ImageBundleRuntime, RunResult


def _runs(members: np.ndarray) -> list[tuple[int, int, int]]:
    """(source row, destination row, length) of each run of consecutive sample indices, so a
    gather is a few large copies instead of one per sample."""
    if len(members) == 0:
        return []
    breaks = np.flatnonzero(np.diff(members) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(members)]])
    return [(int(members[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


def _device_session(sess, name: str):
    """The object that owns the stream and ``enqueue``: a TensorRT session whose engine was
    refused hands over to its ONNX fallback, which must itself be a GPU session."""
    inner = sess
    if getattr(sess, "engine", "n/a") is None:  # TensorRTSession without a usable engine
        inner = sess._fallback
    if not (hasattr(inner, "enqueue") and hasattr(inner, "stream")):
        raise BackendError(f"{name}: its session ({type(inner).__name__}) cannot run on the GPU "
                           f"(for a TensorRT fallback, install onnxruntime-gpu).")
    # the runtime's buffers hold float32 batches and logits, as every bundle graph takes and gives
    for what in ("input_dtype", "output_dtype"):
        dt = np.dtype(getattr(inner, what, np.float32))
        if dt != np.float32:
            raise BackendError(f"{name}: graph {what.split('_')[0]} is {dt}; GpuRuntime serves float32 graphs.")
    return inner


def _wants_graph(sess, n: int) -> bool:
    return bool(getattr(sess, "wants_graph", None) and sess.wants_graph(n))


def _enqueue(sess, src: int, n: int, dst: int, graph: bool) -> None:
    if graph:
        sess.enqueue(src, n, dst, graph=True)
    else:
        sess.enqueue(src, n, dst)


def _out_shape(sess, n: int) -> tuple[int, ...]:
    return sess.output_shape(n) if hasattr(sess, "output_shape") else (n, *sess.output_tail)


class GpuRuntime(ImageBundleRuntime):
    """A loaded bundle on one GPU. ``run(batch)`` returns the CPU ``Runtime``'s ``RunResult``."""

    def __init__(self, root: Path, manifest: dict, backend: str = "onnxruntime-cuda", device=None,
                 variant: str | None = None, only_expert: str | None = None, session_factory=None,
                 cuda_graph: bool = False, max_graphs: int = 8, speculate_below: int = 0,
                 queue: QueueConfig | None = None):
        if backend not in GPU_BACKENDS:
            raise BackendError(f"unknown GPU backend {backend!r}; supported: {sorted(GPU_BACKENDS)}.")
        super().__init__(root, manifest, queue, only_expert)
        self.backend = backend
        have = list(manifest["backends"])
        if variant in (None, "auto"):
            # TensorRT needs the S8S8 graphs; ONNX Runtime CUDA runs either, and S8S8 is the
            # graph made for GPUs, so it wins where the bundle has it
            variant = "tensorrt" if "tensorrt" in have else "onnxruntime-cpu"
        if backend == "tensorrt" and variant != "tensorrt":
            raise BackendError(f"backend 'tensorrt' needs the bundle's tensorrt (S8S8) graphs; it offers {have}.")
        self.variant = variant
        if device is None:
            from moqe_compile.backends.cuda_device import CudaDevice

            device = CudaDevice()
        self.device = device
        if cuda_graph and backend != "onnxruntime-cuda":
            raise BackendError(f"cuda_graph needs the 'onnxruntime-cuda' backend, not {backend!r}.")
        if session_factory is None:
            cls = GPU_BACKENDS[backend]
            graph_kw = {"cuda_graph": True, "max_graphs": max_graphs} if cuda_graph else {}

            def session_factory(name, path, dev):
                return cls(name, path, device=dev, **graph_kw)

            session_factory.accepts_graph = getattr(cls, "accepts_graph", False)

        self._sessions = []  # everything to close, wrappers included
        self._experts = []
        routing = manifest["routing"]
        try:
            for e in manifest["experts"]:
                if only_expert not in (None, e["name"]):
                    self._experts.append(None)
                    continue
                if self.variant not in e["variants"]:
                    raise BackendError(f"expert {e['name']!r} has no {self.variant!r} graph; it has "
                                       f"{sorted(e['variants'])}.")
                rel = e["variants"][self.variant]["path"]
                s = session_factory(e["name"], self._graph(session_factory, rel, self.num_classes), device)
                self._sessions.append(s)
                self._experts.append(_device_session(s, e["name"]))
            if routing["enabled"] and only_expert is None:
                r = session_factory("router", self._graph(session_factory, manifest["router"]["path"],
                                                          len(self.expert_names)), device)
                self._sessions.append(r)
                self._router = _device_session(r, "router")
        except BaseException:
            for s in self._sessions:  # release the streams and buffers made so far
                s.close()
            raise
        if speculate_below < 0:
            raise InputError(f"speculate_below = {speculate_below}; expected 0 (off) or a batch size >= 1.")
        self.speculate_below = int(speculate_below)
        self._buffers = Buffers(device)
        self._join = device.stream()
        self._input_ready = device.event()
        self._done = {id(s): device.event() for s in self._experts if s is not None}
        self._turn = threading.Lock()  # calls take turns: the buffers are shared

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime-cuda", verify: bool = True, device=None,
             variant: str | None = None, only_expert: str | None = None, session_factory=None,
             cuda_graph: bool = False, max_graphs: int = 8, speculate_below: int = 0,
             queue: QueueConfig | None = None) -> "GpuRuntime":
        """Open a bundle (hashes verified unless ``verify=False``) and create every GPU session
        once. ``variant``: which expert graphs (default: ``tensorrt`` where the bundle has it,
        else ``onnxruntime-cpu``); ``only_expert``: that expert alone, no router;
        ``cuda_graph``: replay CUDA graphs per batch size; ``speculate_below``: run every expert
        beside the router on batches this small (both in the module docstring); ``queue``: the
        dynamic batcher behind ``submit``."""
        b = read_bundle(path, verify=verify)
        return cls(b.root, b.manifest, backend, device, variant, only_expert, session_factory, cuda_graph,
                   max_graphs, speculate_below, queue)

    def describe(self) -> dict:
        """Device, backend and the execution provider each session really uses."""
        out = {**self.device.describe(), "backend": self.backend, "variant": self.variant,
               "sessions": {s.name: getattr(s, "providers", ["?"])[0] for s in self._sessions}}
        live = [s for s in [self._router, *self._experts] if s is not None]
        if any(getattr(s, "cuda_graph", False) or getattr(s, "graph_error", None) for s in live):
            out["cuda_graphs"] = {s.name: (f"sizes {s.graph_sizes}" if s.cuda_graph else f"refused: {s.graph_error}")
                                  for s in live}
        return out

    def _run(self, batch: np.ndarray) -> RunResult:
        with self._turn:
            return self._run_on_device(batch)

    def _run_on_device(self, batch: np.ndarray) -> RunResult:
        dev, buf = self.device, self._buffers
        n = len(batch)
        row = int(np.prod(batch.shape[1:])) * 4
        t0 = time.perf_counter()
        first = self._router or self._experts[self.default_expert]
        gx = _wants_graph(first, n)
        kx = f"@{n}" if gx else ""  # a graphed size binds buffers of its own (fixed addresses)
        host_x = buf.host_array("x", np.float32, batch.shape)
        host_x[...] = batch
        d_x = buf.device_ptr("x" + kx, n * row)
        dev.copy(d_x, host_x.ctypes.data, n * row, "h2d", first.stream)
        dev.record(self._input_ready, first.stream)
        if self._router is not None and n <= self.speculate_below:
            return self._run_speculative(d_x, n, gx, t0)
        if self._router is not None:
            r = self._router
            host_p = self._launch(r, "probs", d_x, n, keyed=gx, graph=gx)
            dev.synchronize(r.stream)  # host sync 1: grouping needs the probabilities here
            idx, conf = apply_fallback(np.array(host_p), self.fallback_threshold, self.fallback_expert)
        else:
            idx, conf = np.full(n, self.default_expert), np.ones(n, np.float32)
        t1 = time.perf_counter()
        groups = group_by_expert(idx)
        outs = []
        for k, members in groups:
            s = self._experts[k]
            if s is None:
                raise InputError(f"expert {self.expert_names[k]!r} was not loaded.")
            m = len(members)
            gk = _wants_graph(s, m)
            dev.wait(s.stream, self._input_ready)
            if m == n:  # one expert takes the whole batch: read the input where it is
                src = d_x
            else:
                src = buf.device_ptr(f"x/{k}" + (f"@{m}" if gk else ""), m * row)
                for from_row, to_row, length in _runs(members):
                    dev.copy(src + to_row * row, d_x + from_row * row, length * row, "d2d", s.stream)
            outs.append(self._launch(s, f"y/{k}", src, m, keyed=gk, graph=gk))
            self._join_on(s)
        dev.synchronize(self._join)  # host sync 2: once for every expert of the batch
        out = scatter(groups, outs, n)  # copies out of the pinned buffers
        t2 = time.perf_counter()
        return RunResult(out, idx, [self.expert_names[k] for k in idx], conf, timing(t0, t1, t2),
                         self.fell_back(conf))

    def _launch(self, s, name: str, src: int, n: int, keyed: bool, graph: bool) -> np.ndarray:
        """Enqueue session ``s`` on ``n`` rows at ``src`` into the device buffer ``name`` (keyed
        by batch size where a graph will replay it) and the copy back into a pinned buffer,
        which is returned (valid after the stream syncs)."""
        buf = self._buffers
        with s.lock:  # a TensorRT context's shapes are set per call: shape and run together
            host = buf.host_array(name, np.float32, _out_shape(s, n))
            dst = buf.device_ptr(name + (f"@{n}" if keyed else ""), host.nbytes)
            _enqueue(s, src, n, dst, graph)
        self.device.copy(host.ctypes.data, dst, host.nbytes, "d2h", s.stream)
        return host

    def _join_on(self, s) -> None:
        """The join stream (host sync 2) waits for everything enqueued on ``s`` so far."""
        self.device.record(self._done[id(s)], s.stream)
        self.device.wait(self._join, self._done[id(s)])

    def _run_speculative(self, d_x: int, n: int, gx: bool, t0: float) -> RunResult:
        """Router and every loaded expert on the whole batch at once; keep the routed rows."""
        dev, r = self.device, self._router
        # the router first: its result is the one the host waits for
        host_p = self._launch(r, "probs", d_x, n, keyed=gx, graph=gx)
        outs = {}
        for k, s in enumerate(self._experts):
            if s is None:
                continue
            dev.wait(s.stream, self._input_ready)
            gk = _wants_graph(s, n)
            # d_x is fixed only where the router graphs n
            outs[k] = self._launch(s, f"y/{k}", d_x, n, keyed=gk, graph=gk and gx)
            self._join_on(s)
        dev.synchronize(r.stream)  # host sync 1: the routing decision
        idx, conf = apply_fallback(np.array(host_p), self.fallback_threshold, self.fallback_expert)
        t1 = time.perf_counter()
        dev.synchronize(self._join)  # host sync 2: every expert's rows are back
        missing = sorted({int(k) for k in idx} - set(outs))
        if missing:
            raise InputError(f"expert {self.expert_names[missing[0]]!r} was not loaded.")
        out = np.empty((n, *outs[int(idx[0])].shape[1:]), np.float32)
        for k, y in outs.items():
            rows = idx == k
            out[rows] = y[rows]
        t2 = time.perf_counter()
        return RunResult(out, idx, [self.expert_names[k] for k in idx], conf, timing(t0, t1, t2),
                         self.fell_back(conf))

    def run_expert(self, name: str, batch: np.ndarray) -> np.ndarray:
        """One expert alone through its session's own ``run`` (benchmarks' single-expert baseline)."""
        s = self._experts[self.expert_names.index(name)]
        if s is None:
            raise InputError(f"expert {name!r} was not loaded.")
        return s.run(self._check(batch))

    def _release(self) -> None:
        with self._turn:
            for s in self._sessions:
                s.close()
            self._buffers.close()
            self.device.destroy_stream(self._join)
            for ev in [self._input_ready, *self._done.values()]:
                self.device.destroy_event(ev)
