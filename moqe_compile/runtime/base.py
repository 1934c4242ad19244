"""``Runtime``: load a bundle once, then ``run(batch)`` from any number of threads.

Per call: the router scores the whole batch, samples are grouped by chosen expert, each
group runs as one batch on its expert, and outputs return in input order. No state is
shared between calls except the immutable sessions, so concurrent ``run`` calls are safe.

Confidence fallback: where the manifest has ``routing.fallback_threshold`` t > 0, inputs
whose router confidence (max probability) is below t are served by
``routing.fallback_expert`` (the best single expert on validation; t was chosen on the
validation split at build time). The reported confidence stays the router's max
probability. Bundles without the field route by argmax alone.

The router graph gets two sessions: batches of at most ``router_threads_max_batch`` (2) run
on ``router_threads`` (1) intra-op threads, larger ones with the experts' setting. A router's
ops are tiny, and at batch 1-2 ONNX Runtime's thread hand-offs cost more than they save
(measured on 2 cores, batch 1: default router 0.61 ms on one thread vs 0.82 ms on two; at
batch 32 one thread is slower, 14.0 vs 8.3 ms; bench/router_budget.py).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moqe_compile.backends import BACKENDS, resolve_backend
from moqe_compile.bundle import read_bundle
from moqe_compile.tasks.image.preprocess import Preprocess, load_inputs
from moqe_compile.errors import InputError, MoqeError
from moqe_compile.router.fallback import apply_fallback
from moqe_compile.runtime.batcher import DynamicBatcher
from moqe_compile.runtime.dispatch import group_by_expert, scatter


@dataclass
class RunResult:
    logits: np.ndarray  # (N, C) float32
    expert_index: np.ndarray  # (N,) int
    experts: list[str]  # expert name per sample
    confidence: np.ndarray  # (N,) router confidence: its max probability (also where the input fell back)
    timing_ms: dict[str, float] = field(default_factory=dict)
    fell_back: np.ndarray | None = None  # (N,) bool: served by routing.fallback_expert for low confidence

    def slice(self, start: int, stop: int) -> "RunResult":
        """The result of samples ``start:stop`` (one request's share of a merged batch); the
        timing is the merged batch's."""
        sl = slice(start, stop)
        return RunResult(self.logits[sl], self.expert_index[sl], self.experts[sl], self.confidence[sl],
                         dict(self.timing_ms), None if self.fell_back is None else self.fell_back[sl])

    def topk(self, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        z = self.logits - self.logits.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        idx = np.argsort(-p, axis=-1)[:, :k]
        return idx, np.take_along_axis(p, idx, -1)


class _RouterSessions:
    """The router's two sessions behind one ``run``: few threads for small batches."""

    name = "router"

    def __init__(self, small, large, max_small_batch: int):
        self.small, self.large, self.max_small_batch = small, large, max_small_batch

    def run(self, x: np.ndarray) -> np.ndarray:
        return (self.small if self.small is not None and len(x) <= self.max_small_batch else self.large).run(x)

    def close(self) -> None:
        for s in (self.small, self.large):
            if s is not None:
                s.close()


@dataclass(frozen=True)
class QueueConfig:
    """The bounded queue behind ``Runtime.submit``: requests arriving within ``max_delay_ms``
    of the oldest waiting one are merged up to ``max_batch`` samples; at most ``max_queue``
    requests wait (more raise ``OverloadedError``); ``workers`` threads call ``run``."""

    max_batch: int = 32
    max_delay_ms: float = 2.0
    max_queue: int = 256
    workers: int = 1


class _BundleRuntime:
    """What the CPU and GPU runtimes both answer from the loaded manifest."""

    preprocess: Preprocess
    _router: object | None

    @property
    def routed(self) -> bool:
        """False when the bundle serves one expert without running the router."""
        return self._router is not None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocess.input_shape


class Runtime(_BundleRuntime):
    """A loaded bundle. ``run(batch)`` runs at once on the calling thread; ``submit(batch)``
    queues it for the dynamic batcher and returns a ``Future[RunResult]``. Both are safe from
    any number of threads. ``close()`` (or leaving a ``with`` block) drains queued requests,
    waits for running calls, then releases every session."""

    def __init__(self, root: Path, manifest: dict, backend: str, intra_op_threads: int = 0, router_threads: int = 1,
                 router_threads_max_batch: int = 2, queue: QueueConfig | None = None,
                 only_expert: str | None = None, route_only: bool = False):
        self.root, self.manifest, self.backend = root, manifest, backend
        self.queue_config = queue or QueueConfig()
        self._batcher: DynamicBatcher | None = None
        self._lock = threading.Condition()
        self._running = 0
        self.preprocess = Preprocess.from_dict(manifest["preprocessing"])
        self.labels: list[str] = json.loads((root / manifest["task"]["labels"]["path"]).read_text())
        cls = BACKENDS[backend]
        self.expert_names = [e["name"] for e in manifest["experts"]]
        routing = manifest["routing"]
        if only_expert is not None and only_expert not in self.expert_names:
            raise InputError(f"expert {only_expert!r} is not in this bundle; it has {self.expert_names}.")
        # only_expert: serve that expert alone, no router (benchmarks' single-expert baseline);
        # the other experts' sessions are never created.
        # route_only: the router alone (a scale-out ingress whose experts run elsewhere).
        self._experts = [cls(e["name"], root / e["variants"][backend]["path"], intra_op_threads)
                         if only_expert in (None, e["name"]) and not route_only else None
                         for e in manifest["experts"]]
        self.default_expert = self.expert_names.index(only_expert or routing["default_expert"])
        self._router = None
        if routing["enabled"] and only_expert is None:
            rpath = root / manifest["router"]["path"]
            few = (cls("router", rpath, router_threads)
                   if router_threads != intra_op_threads and router_threads_max_batch > 0 else None)
            self._router = _RouterSessions(few, cls("router", rpath, intra_op_threads), router_threads_max_batch)
        # Bundles written before the fallback existed have no threshold: argmax routing only.
        self.fallback_threshold = float(routing.get("fallback_threshold", 0.0))
        fb = routing.get("fallback_expert", routing["default_expert"])
        self.fallback_expert = self.expert_names.index(fb)
        self._closed = False

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", verify: bool = True, intra_op_threads: int = 0,
             router_threads: int = 1, router_threads_max_batch: int = 2,
             queue: QueueConfig | None = None, only_expert: str | None = None,
             route_only: bool = False) -> "Runtime":
        """Open a bundle (hashes verified unless ``verify=False``) and create every session once.
        ``intra_op_threads``: experts, and the router above ``router_threads_max_batch``
        (0: ONNX Runtime's default); ``router_threads``: the router on small batches;
        ``queue``: the dynamic batcher behind ``submit``; ``only_expert``: serve that expert
        alone without the router; ``route_only``: load the router and no expert (``route``
        works, ``run`` does not)."""
        b = read_bundle(path, verify=verify)
        name = resolve_backend(backend, b.manifest["backends"])
        return cls(b.root, b.manifest, name, intra_op_threads, router_threads, router_threads_max_batch, queue,
                   only_expert, route_only)

    def submit(self, batch: np.ndarray) -> Future:
        """Queue ``batch`` (checked now, so a bad one fails here and not in a merged batch) for
        the dynamic batcher; ``Future.result()`` gives this batch's ``RunResult``. Raises
        ``OverloadedError`` when the queue is full or the runtime is closing."""
        batch = self._check(batch)
        return self.batcher.submit(batch)

    @property
    def batcher(self) -> DynamicBatcher:
        """The batcher behind ``submit``, created on first use: queue depth, metrics hook."""
        with self._lock:
            if self._closed:
                raise MoqeError("Runtime is closed.")
            if self._batcher is None:
                q = self.queue_config
                # Inputs are checked in submit, so the worker runs them unchecked.
                self._batcher = DynamicBatcher(self._run_counted, RunResult.slice, q.max_batch, q.max_delay_ms,
                                               q.max_queue, q.workers)
            return self._batcher

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, drain: bool = True) -> None:
        """Finish (``drain``) or fail the queued requests, wait for running calls, release sessions."""
        with self._lock:
            if self._closed:
                return
            batcher = self._batcher
        if batcher is not None:
            batcher.close(drain=drain)
        with self._lock:
            self._closed = True
            while self._running:
                self._lock.wait()
        for s in [*self._experts, *([self._router] if self._router else [])]:
            if s is not None:
                s.close()

    def load_inputs(self, path: str | Path) -> tuple[list[str], np.ndarray]:
        return load_inputs(path, self.preprocess)

    def route(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(expert index, confidence) per sample: argmax of the router's probabilities, or the
        fallback expert where the confidence (max probability) is below the bundle's threshold."""
        if self._router is None:
            n = len(batch)
            return np.full(n, self.default_expert), np.ones(n, np.float32)
        return apply_fallback(self._router.run(batch), self.fallback_threshold, self.fallback_expert)

    def run(self, batch: np.ndarray) -> RunResult:
        return self._run_counted(self._check(batch))

    def _run_counted(self, batch: np.ndarray) -> RunResult:
        """``_run`` on a checked batch, counted so ``close`` can wait for it."""
        with self._lock:
            if self._closed:
                raise MoqeError("Runtime is closed.")
            self._running += 1
        try:
            return self._run(batch)
        finally:
            with self._lock:
                self._running -= 1
                self._lock.notify_all()

    def _run(self, batch: np.ndarray) -> RunResult:
        t0 = time.perf_counter()
        idx, conf = self.route(batch)
        t1 = time.perf_counter()
        groups = group_by_expert(idx)
        out = scatter(groups, [self._session(k).run(np.ascontiguousarray(batch[m])) for k, m in groups], len(batch))
        t2 = time.perf_counter()
        timing = {"router": (t1 - t0) * 1e3, "experts": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
        fell_back = ((conf < self.fallback_threshold) if self._router is not None
                     else np.zeros(len(idx), bool))
        return RunResult(out, idx, [self.expert_names[k] for k in idx], conf, timing, fell_back)

    def run_expert(self, name: str, batch: np.ndarray) -> np.ndarray:
        """Run one expert alone (benchmarks, controls)."""
        return self._session(self.expert_names.index(name)).run(self._check(batch))

    def _session(self, k: int):
        sess = self._experts[k]
        if sess is None:
            loaded = [n for n, e in zip(self.expert_names, self._experts) if e is not None]
            raise InputError(f"expert {self.expert_names[k]!r} was not loaded (this runtime has {loaded}).")
        return sess

    def check(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` as the contiguous float32 (N, C, H, W) the graphs take, or an InputError."""
        return self._check(batch)

    def _check(self, batch: np.ndarray) -> np.ndarray:
        shape = self.preprocess.input_shape
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or tuple(batch.shape[1:]) != shape:
            got = getattr(batch, "shape", type(batch).__name__)
            raise InputError(f"batch has shape {got}; expected (N, {shape[0]}, {shape[1]}, {shape[2]}).")
        if batch.dtype != np.float32:
            raise InputError(f"batch has dtype {batch.dtype}; expected float32 (preprocessed).")
        if len(batch) == 0:
            raise InputError("batch is empty.")
        return np.ascontiguousarray(batch)
