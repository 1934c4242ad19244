"""Dynamic batching in front of a runtime's ``run``: a bounded queue and worker threads.

Requests (each a batch of one or more samples) that arrive within ``max_delay_ms`` of the
oldest waiting request are merged, up to ``max_batch`` samples, into one ``run``
call: one router pass, one expert run per expert group. Each request gets its own slice
of the result back through a ``concurrent.futures.Future``, so synchronous callers
(``.result()``) and asyncio servers (``asyncio.wrap_future``) use the same path.

Hand-written rather than taken from a serving library because the merge must happen
*before* routing (routing groups per expert across all merged requests) and the queue
bound must surface as an error the caller can turn into HTTP 503.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from moqe_compile.errors import MoqeError, OverloadedError

log = logging.getLogger(__name__)

# Batchers not closed yet. Their workers are daemon threads: a script that exits without
# close() would otherwise tear the interpreter down while a worker is inside ONNX Runtime,
# which aborts the process (SIGABRT, "terminate called without an active exception").
_OPEN: "weakref.WeakSet[DynamicBatcher]" = weakref.WeakSet()


@atexit.register
def _close_open_batchers() -> None:
    """At exit: fail what is still queued and wait (a bounded time: a hung backend must not
    hold the exit forever) for the batches running now."""
    for b in list(_OPEN):
        b.close(drain=False, timeout=30)


@dataclass
class _Request:
    x: np.ndarray
    future: Future
    t_enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """``submit(x) -> Future`` of ``run(x)``'s result for that request alone.

    ``max_queue`` bounds the waiting *requests*; a full queue raises ``OverloadedError`` at
    once (the caller decides whether to retry) instead of letting latency grow without bound.
    A request with more than ``max_batch`` samples runs alone, never split. ``merge`` joins
    requests' batches into one (``np.concatenate`` for arrays; a list merge for texts).
    ``close(drain=True)`` stops accepting, finishes everything already queued, then joins.
    """

    def __init__(self, run: Callable[[np.ndarray], object], split: Callable[[object, int, int], object],
                 max_batch: int = 32, max_delay_ms: float = 2.0, max_queue: int = 256, workers: int = 1,
                 merge: Callable[[list], object] = np.concatenate):
        if max_batch < 1 or max_queue < 1 or workers < 1 or max_delay_ms < 0:
            raise MoqeError(f"batcher needs max_batch >= 1 (got {max_batch}), max_queue >= 1 (got {max_queue}), "
                            f"workers >= 1 (got {workers}) and max_delay_ms >= 0 (got {max_delay_ms}).")
        self._run, self._split, self._merge = run, split, merge
        self.max_batch, self.max_delay, self.max_queue = max_batch, max_delay_ms / 1e3, max_queue
        self._q: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._in_flight = 0
        # Observer (metrics): called with (result, batch_size, n_requests) after each merged run.
        self.on_batch: Callable[[object, int, int], None] | None = None
        self._threads = [threading.Thread(target=self._work, name=f"moqe-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()
        _OPEN.add(self)

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken by a worker)."""
        return len(self._q)

    @property
    def in_flight(self) -> int:
        """Requests taken by a worker and not yet answered."""
        return self._in_flight

    def submit(self, x: np.ndarray) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closing:
                raise OverloadedError("the runtime is shutting down; send the request to another replica.")
            if len(self._q) >= self.max_queue:
                raise OverloadedError(f"request queue is full ({self.max_queue} waiting); retry later.")
            self._q.append(_Request(x, fut))
            self._cv.notify()
        return fut

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._cv:
            self._closing = True
            if not drain:
                while self._q:
                    r = self._q.popleft()
                    if r.future.set_running_or_notify_cancel():
                        r.future.set_exception(OverloadedError("the runtime closed before this request ran."))
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)
        _OPEN.discard(self)

    def _take(self) -> list[_Request] | None:
        with self._cv:
            while not self._q:
                if self._closing:
                    return None
                self._cv.wait()
            first = self._q.popleft()
            taken, n = [first], len(first.x)
            # The delay is counted from the oldest request's arrival, so batching never
            # holds any request longer than max_delay_ms.
            deadline = first.t_enqueued + self.max_delay
            while n < self.max_batch:
                if self._q:
                    if n + len(self._q[0].x) > self.max_batch:
                        break
                    r = self._q.popleft()
                    taken.append(r)
                    n += len(r.x)
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._closing:
                    break
                self._cv.wait(left)
            self._in_flight += len(taken)
            return taken

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            live = [r for r in taken if r.future.set_running_or_notify_cancel()]
            try:
                if live:
                    self._answer(live)
            finally:
                with self._cv:
                    self._in_flight -= len(taken)

    def _answer(self, live: list[_Request]) -> None:
        try:
            x = live[0].x if len(live) == 1 else self._merge([r.x for r in live])
            res = self._run(x)
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear about the failure
            for r in live:
                r.future.set_exception(e)
            return
        if self.on_batch is not None:
            try:
                self.on_batch(res, len(x), len(live))
            except Exception:  # noqa: BLE001 - a metrics hook must never stop the worker or lose answers
                log.exception("the on_batch hook failed; the batch's answers are delivered anyway")
        start = 0
        for r in live:
            try:
                r.future.set_result(self._split(res, start, start + len(r.x)))
            except BaseException as e:  # noqa: BLE001 - the caller hears about it instead of waiting forever
                r.future.set_exception(e)
            start += len(r.x)
