"""``BundleRuntime``: what every task's runtime shares, with no knowledge of the task.

A loaded bundle answers ``route(batch)`` (the router, or the default expert where the
bundle's gate refused routing), ``run(batch)`` at once on the calling thread, and
``submit(batch)`` through the dynamic batcher (a ``Future`` of ``run``'s result for that
batch alone). ``close()`` (or leaving a ``with`` block) drains queued requests, waits for
running calls, then releases every session. No state is shared between calls except the
immutable sessions, so concurrent ``run`` calls are safe.

Confidence fallback: where the manifest has ``routing.fallback_threshold`` t > 0, inputs
whose router confidence (max probability) is below t are served by
``routing.fallback_expert`` (the best single expert on validation; t was chosen on the
validation split at build time). The reported confidence stays the router's max
probability. Bundles without the field route by argmax alone.

A task's runtime (``tasks/<task>/runtime.py``) says what a batch is (``_check``), how the
router scores it (``_router_probs``), how the experts answer it (``_run``) and which
sessions to release (``_release``). This module imports nothing from ``moqe_compile.tasks``:
the plug-ins build on it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moqe_compile.errors import ConfigError, MoqeError, OverloadedError
from moqe_compile.router.fallback import apply_fallback
from moqe_compile.runtime.batcher import DynamicBatcher


@dataclass
class RunResult:
    """One call's answer, one entry per sample in input order (``timing_ms`` is the call's)."""

    outputs: Any  # (N, ...) array or a list of N per-sample results: the task's outputs
    expert_index: np.ndarray  # (N,) int
    experts: list[str]  # expert name per sample
    confidence: np.ndarray  # (N,) router confidence: its max probability (1.0 where the router did not run)
    timing_ms: dict[str, float] = field(default_factory=dict)
    fell_back: np.ndarray | None = None  # (N,) bool: served by routing.fallback_expert for low confidence

    def __len__(self) -> int:
        return len(self.expert_index)

    def slice(self, start: int, stop: int) -> "RunResult":
        """The result of samples ``start:stop`` (one request's share of a merged batch); the
        timing is the merged batch's."""
        sl = slice(start, stop)
        return type(self)(self.outputs[sl], self.expert_index[sl], self.experts[sl], self.confidence[sl],
                          dict(self.timing_ms), None if self.fell_back is None else self.fell_back[sl])


class RouterSessions:
    """The router's two sessions behind one ``run``: few threads for small batches, where
    thread hand-offs cost more than a tiny graph's ops save (bench/router_budget.py)."""

    name = "router"

    def __init__(self, small, large, max_small_batch: int):
        self.small, self.large, self.max_small_batch = small, large, max_small_batch

    def run(self, x: np.ndarray) -> np.ndarray:
        use_small = self.small is not None and len(x) <= self.max_small_batch
        return (self.small if use_small else self.large).run(x)

    def close(self) -> None:
        for s in (self.small, self.large):
            if s is not None:
                s.close()


@dataclass(frozen=True)
class QueueConfig:
    """The bounded queue behind ``submit``: requests arriving within ``max_delay_ms`` of the
    oldest waiting one are merged up to ``max_batch`` samples; at most ``max_queue``
    requests wait (more raise ``OverloadedError``); ``workers`` threads call ``run``."""

    max_batch: int = 32
    max_delay_ms: float = 2.0
    max_queue: int = 256
    workers: int = 1


def concatenate(parts: list) -> Any:
    """Merge requests' batches into one: arrays along the sample axis, lists end to end."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [item for part in parts for item in part]


class BundleRuntime:
    """A loaded bundle: routing, the counted ``run``, the batcher behind ``submit``, ``close``.

    Subclasses set ``_router`` (or leave it None when the bundle serves one expert) and
    implement ``_check``, ``_run`` and ``_release``; ``_router_probs`` when they route.
    """

    def __init__(self, root, manifest: dict, queue: QueueConfig | None = None):
        self.root, self.manifest = root, manifest
        if queue is not None and not isinstance(queue, QueueConfig):
            raise ConfigError(f"queue must be a QueueConfig, not {type(queue).__name__}.")
        self.queue_config = queue or QueueConfig()
        self.expert_names: list[str] = [e["name"] for e in manifest["experts"]]
        routing = manifest["routing"]
        self.default_expert = self.expert_names.index(routing["default_expert"])
        # Bundles written before the fallback existed have no threshold: argmax routing only.
        self.fallback_threshold = float(routing.get("fallback_threshold", 0.0))
        self.fallback_expert = self.expert_names.index(routing.get("fallback_expert", routing["default_expert"]))
        self._router = None
        self._batcher: DynamicBatcher | None = None
        self._closing = self._released = False  # close() in progress / sessions released
        self._lock = threading.Condition()
        self._running = 0
        self._closed = False

    # ------------------------------------------------------------ what a task provides
    def _check(self, batch):
        """``batch`` validated (and converted) for ``_run``, or an ``InputError``."""
        raise NotImplementedError

    def _run(self, batch) -> RunResult:
        raise NotImplementedError

    def _router_probs(self, batch) -> np.ndarray:
        """(N, K) router probabilities for a checked batch."""
        return self._router.run(batch)

    def _release(self) -> None:
        """Release every session (called once, after the last call finished)."""

    # ------------------------------------------------------------ shared
    @property
    def routed(self) -> bool:
        """False when the bundle serves one expert without running the router."""
        return self._router is not None

    @property
    def router_session(self):
        """The router's session (``run(x) -> probabilities``), or None when not routed."""
        return self._router

    @property
    def closed(self) -> bool:
        return self._closed

    def route(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(expert index, confidence) per sample: argmax of the router's probabilities, or the
        fallback expert where the confidence (max probability) is below the bundle's threshold."""
        if not self.routed:
            n = len(batch)
            return np.full(n, self.default_expert), np.ones(n, np.float32)
        return apply_fallback(self._router_probs(batch), self.fallback_threshold, self.fallback_expert)

    def fell_back(self, confidence: np.ndarray) -> np.ndarray:
        """(N,) bool: which samples the confidence fallback sent to the fallback expert."""
        if not self.routed:
            return np.zeros(len(confidence), bool)
        return confidence < self.fallback_threshold

    def check(self, batch):
        """``batch`` as ``run`` takes it, or an ``InputError`` naming what is wrong."""
        return self._check(batch)

    def run(self, batch) -> RunResult:
        return self._run_counted(self._check(batch))

    def submit(self, batch) -> Future:
        """Queue ``batch`` (checked now, so a bad one fails here and not in a merged batch) for
        the dynamic batcher; ``Future.result()`` gives this batch's ``RunResult``. Raises
        ``OverloadedError`` when the queue is full or the runtime is closing."""
        return self.batcher.submit(self._check(batch))

    @property
    def batcher(self) -> DynamicBatcher:
        """The batcher behind ``submit``, created on first use: queue depth, metrics hook."""
        with self._lock:
            self._raise_if_closed()
            if self._closing:
                raise OverloadedError(f"{type(self).__name__} is closing: retry on another replica.")
            if self._batcher is None:
                q = self.queue_config
                # Inputs are checked in submit, so the worker runs them unchecked.
                self._batcher = DynamicBatcher(self._run_counted, RunResult.slice, q.max_batch, q.max_delay_ms,
                                               q.max_queue, q.workers, merge=concatenate)
            return self._batcher

    @contextmanager
    def counted(self) -> Iterator[None]:
        """Count a call as running, so ``close`` waits for it; refused once closed."""
        with self._lock:
            self._raise_if_closed()
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                self._lock.notify_all()

    def _run_counted(self, batch) -> RunResult:
        with self.counted():
            return self._run(batch)

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise MoqeError(f"{type(self).__name__} is closed.")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, drain: bool = True) -> None:
        """Finish (``drain``) or fail the queued requests, wait for running calls, release sessions."""
        with self._lock:
            if self._closing:  # another thread is closing it: return once it has finished
                while not self._released:
                    self._lock.wait()
                return
            self._closing = True  # from here on no batcher is created (the property refuses)
            batcher = self._batcher
        if batcher is not None:
            batcher.close(drain=drain)
        with self._lock:
            self._closed = True
            while self._running:
                self._lock.wait()
        try:
            self._release()
        finally:
            with self._lock:
                self._released = True
                self._lock.notify_all()


def timing(t0: float, t1: float, t2: float) -> dict[str, float]:
    """Milliseconds spent routing (t0..t1), in the experts (t1..t2) and in all."""
    return {"router": (t1 - t0) * 1e3, "experts": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
