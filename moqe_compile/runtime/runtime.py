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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backends import BACKENDS, resolve_backend
from ..bundle import read_bundle
from ..data.images import Preprocess, load_inputs
from ..errors import InputError, MoqeError
from ..router.fallback import apply_fallback


@dataclass
class RunResult:
    logits: np.ndarray  # (N, C) float32
    expert_index: np.ndarray  # (N,) int
    experts: list[str]  # expert name per sample
    confidence: np.ndarray  # (N,) router confidence: its max probability (also where the input fell back)
    timing_ms: dict[str, float] = field(default_factory=dict)
    fell_back: np.ndarray | None = None  # (N,) bool: served by routing.fallback_expert for low confidence

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


class Runtime:
    def __init__(self, root: Path, manifest: dict, backend: str, intra_op_threads: int = 0, router_threads: int = 1,
                 router_threads_max_batch: int = 2):
        self.root, self.manifest, self.backend = root, manifest, backend
        self.preprocess = Preprocess.from_dict(manifest["preprocessing"])
        self.labels: list[str] = json.loads((root / manifest["task"]["labels"]["path"]).read_text())
        cls = BACKENDS[backend]
        self.expert_names = [e["name"] for e in manifest["experts"]]
        self._experts = [cls(e["name"], root / e["variants"][backend]["path"], intra_op_threads)
                         for e in manifest["experts"]]
        routing = manifest["routing"]
        self.default_expert = self.expert_names.index(routing["default_expert"])
        self._router = None
        if routing["enabled"]:
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
             router_threads: int = 1, router_threads_max_batch: int = 2) -> "Runtime":
        """Open a bundle (hashes verified unless ``verify=False``) and create every session once.
        ``intra_op_threads``: experts, and the router above ``router_threads_max_batch``
        (0: ONNX Runtime's default); ``router_threads``: the router on small batches."""
        b = read_bundle(path, verify=verify)
        name = resolve_backend(backend, b.manifest["backends"])
        return cls(b.root, b.manifest, name, intra_op_threads, router_threads, router_threads_max_batch)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for s in [*self._experts, *([self._router] if self._router else [])]:
            s.close()
        self._closed = True

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
        if self._closed:
            raise MoqeError("Runtime is closed.")
        batch = self._check(batch)
        t0 = time.perf_counter()
        idx, conf = self.route(batch)
        t1 = time.perf_counter()
        out = None
        for k in np.unique(idx):
            members = np.nonzero(idx == k)[0]
            y = self._experts[k].run(np.ascontiguousarray(batch[members]))
            if out is None:
                out = np.empty((len(batch), *y.shape[1:]), y.dtype)
            out[members] = y
        t2 = time.perf_counter()
        timing = {"router": (t1 - t0) * 1e3, "experts": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
        fell_back = ((conf < self.fallback_threshold) if self._router is not None
                     else np.zeros(len(idx), bool))
        return RunResult(out, idx, [self.expert_names[k] for k in idx], conf, timing, fell_back)

    def run_expert(self, name: str, batch: np.ndarray) -> np.ndarray:
        """Run one expert alone (benchmarks, controls)."""
        return self._experts[self.expert_names.index(name)].run(self._check(batch))

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
