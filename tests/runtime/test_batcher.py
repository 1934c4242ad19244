import threading
from concurrent.futures import wait

import numpy as np
import onnxruntime as ort
import pytest

from moqe_compile import Runtime
from moqe_compile.errors import InputError, MoqeError, OverloadedError
from moqe_compile.runtime import DynamicBatcher, QueueConfig

from ..models import CROP


def _split(res, a, b):
    return res[a:b]


class _Recorder:
    """A run function that records merged batch sizes and can be held closed."""

    def __init__(self):
        self.sizes, self.gate = [], threading.Event()
        self.gate.set()

    def __call__(self, x):
        self.gate.wait(10)
        self.sizes.append(len(x))
        return x * 2


def test_requests_within_delay_merge_and_come_back_split():
    rec = _Recorder()
    rec.gate.clear()  # hold the first batch so the rest queue up behind it
    b = DynamicBatcher(rec, _split, max_batch=8, max_delay_ms=50, max_queue=100)
    xs = [np.full((3, 2), i, np.float32) for i in range(7)]
    futs = [b.submit(x) for x in xs]
    rec.gate.set()
    for x, f in zip(xs, futs):
        np.testing.assert_array_equal(f.result(5), x * 2)
    b.close()
    assert sum(rec.sizes) == 21 and max(rec.sizes) <= 8 and len(rec.sizes) < 7


def test_oversized_request_runs_alone_unsplit():
    rec = _Recorder()
    b = DynamicBatcher(rec, _split, max_batch=4, max_delay_ms=0)
    assert b.submit(np.ones((10, 2), np.float32)).result(5).shape == (10, 2)
    b.close()
    assert rec.sizes == [10]


def test_full_queue_raises_overloaded_then_recovers():
    rec = _Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, _split, max_batch=1, max_delay_ms=0, max_queue=2)
    first = b.submit(np.zeros((1, 1), np.float32))
    while b.in_flight == 0:  # the worker holds the first; two more fit in the queue
        threading.Event().wait(0.001)
    queued = [b.submit(np.zeros((1, 1), np.float32)) for _ in range(2)]
    with pytest.raises(OverloadedError, match="queue is full \\(2 waiting\\)"):
        b.submit(np.zeros((1, 1), np.float32))
    rec.gate.set()
    assert all(f.result(5).shape == (1, 1) for f in [first, *queued])
    assert b.submit(np.zeros((1, 1), np.float32)).result(5).shape == (1, 1)
    b.close()


def test_close_drains_queued_requests_and_refuses_new_ones():
    rec = _Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, _split, max_batch=1, max_delay_ms=0, max_queue=50)
    futs = [b.submit(np.full((1, 1), i, np.float32)) for i in range(5)]
    closer = threading.Thread(target=b.close)
    closer.start()
    rec.gate.set()
    closer.join(10)
    assert [float(f.result(0)[0, 0]) for f in futs] == [0, 2, 4, 6, 8]
    with pytest.raises(OverloadedError, match="shutting down"):
        b.submit(np.zeros((1, 1), np.float32))


def test_close_without_drain_fails_waiting_requests():
    rec = _Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, _split, max_batch=1, max_delay_ms=0, max_queue=50)
    futs = [b.submit(np.zeros((1, 1), np.float32)) for _ in range(4)]
    while b.in_flight == 0:
        threading.Event().wait(0.001)
    closer = threading.Thread(target=b.close, kwargs={"drain": False})
    closer.start()
    while closer.is_alive() and b.depth:
        threading.Event().wait(0.001)
    rec.gate.set()
    closer.join(10)
    wait(futs, 5)
    assert futs[0].exception() is None
    assert all(isinstance(f.exception(), OverloadedError) for f in futs[1:])


def test_at_exit_open_batchers_fail_what_waits_and_finish_what_runs():
    """A script that exits without close(): the exit hook closes every open batcher, so no
    worker is still inside a session when the interpreter tears down (that aborted the
    process). The request running finishes; the ones waiting fail with OverloadedError."""
    from moqe_compile.runtime import batcher as batcher_module

    rec = _Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, _split, max_batch=1, max_delay_ms=0, max_queue=50)
    assert b in batcher_module._OPEN
    futs = [b.submit(np.zeros((1, 1), np.float32)) for _ in range(3)]
    while b.in_flight == 0:
        threading.Event().wait(0.001)
    hook = threading.Thread(target=batcher_module._close_open_batchers)
    hook.start()
    while hook.is_alive() and b.depth:
        threading.Event().wait(0.001)
    rec.gate.set()
    hook.join(10)
    assert not hook.is_alive() and not any(t.is_alive() for t in b._threads)
    assert futs[0].result(5).shape == (1, 1)
    assert all(isinstance(f.exception(5), OverloadedError) for f in futs[1:])
    assert b not in batcher_module._OPEN


def test_run_failure_reaches_every_merged_caller():
    def boom(x):
        raise ValueError("expert exploded")

    b = DynamicBatcher(boom, _split, max_batch=8, max_delay_ms=20)
    futs = [b.submit(np.zeros((1, 1), np.float32)) for _ in range(3)]
    for f in futs:
        with pytest.raises(ValueError, match="expert exploded"):
            f.result(5)
    b.close()


def test_bad_settings_are_named():
    with pytest.raises(MoqeError, match="max_queue >= 1 \\(got 0\\)"):
        DynamicBatcher(lambda x: x, _split, max_queue=0)


# --- through the Runtime ---------------------------------------------------------------

def _batch(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 3, CROP, CROP)).astype(np.float32)


def test_threads_submitting_get_the_serial_results(tiny_bundle):
    batches = [_batch(1 + i % 3, seed=100 + i) for i in range(24)]
    with Runtime.load(tiny_bundle, queue=QueueConfig(max_batch=16, max_delay_ms=5, max_queue=64)) as rt:
        serial = [rt.run(b) for b in batches]
        got = [None] * len(batches)

        def client(j):  # 4 threads x 6 requests each, all through the shared queue
            for i in range(j, len(batches), 4):
                got[i] = rt.submit(batches[i]).result(30)

        ts = [threading.Thread(target=client, args=(j,)) for j in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    for a, b in zip(serial, got):
        assert a.experts == b.experts
        # Merged batches run the same kernels per sample; only float summation order may differ.
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.confidence, b.confidence, rtol=1e-5, atol=1e-6)


def test_submit_checks_input_before_queueing(tiny_bundle):
    with Runtime.load(tiny_bundle) as rt:
        with pytest.raises(InputError, match="expected \\(N, 3, 32, 32\\)"):
            rt.submit(np.zeros((1, 3, 8, 8), np.float32))


def test_closed_runtime_refuses_work_and_closes_once(tiny_bundle):
    rt = Runtime.load(tiny_bundle)
    fut = rt.submit(_batch(2, 0))
    rt.close()
    assert fut.result(0).logits.shape[0] == 2  # drained before the sessions went
    rt.close()
    for call in (rt.run, rt.submit):
        with pytest.raises(MoqeError, match="closed"):
            call(_batch(1, 0))


def test_only_expert_serves_it_without_router(tiny_bundle):
    with Runtime.load(tiny_bundle) as full:
        name = full.expert_names[1]
        x = _batch(5, 3)
        e = next(e for e in full.manifest["experts"] if e["name"] == name)
        raw = ort.InferenceSession(str(tiny_bundle / e["variants"]["onnxruntime-cpu"]["path"]),
                                   providers=["CPUExecutionProvider"])
        want = raw.run(None, {raw.get_inputs()[0].name: x})[0]  # its graph alone: the oracle
    with Runtime.load(tiny_bundle, only_expert=name) as one:
        assert not one.routed
        res = one.run(x)
        assert set(res.experts) == {name}
        np.testing.assert_array_equal(res.logits, want)
        with pytest.raises(InputError, match="was not loaded"):
            one.run_expert(full.expert_names[0], x)
    with pytest.raises(InputError, match="'nope' is not in this bundle"):
        Runtime.load(tiny_bundle, only_expert="nope")


def test_a_failing_batch_hook_neither_stops_the_worker_nor_loses_answers():
    b = DynamicBatcher(_Recorder(), _split, max_batch=8, max_delay_ms=1)

    def broken_hook(res, n, requests):
        raise RuntimeError("metrics backend down")

    b.on_batch = broken_hook
    for _ in range(2):  # the second request proves the worker survived the first hook failure
        np.testing.assert_array_equal(b.submit(np.ones((1, 1), np.float32)).result(5), [[2.0]])
    b.close()


def test_a_second_close_waits_for_the_first_to_release_the_sessions(tiny_bundle):
    rt = Runtime.load(tiny_bundle)
    started, release, released = threading.Event(), threading.Event(), []
    real = rt._release

    def slow_release():
        started.set()
        release.wait(10)
        real()
        released.append(True)

    rt._release = slow_release
    first = threading.Thread(target=rt.close)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=rt.close)
    second.start()
    second.join(0.3)
    assert second.is_alive()  # still waiting: the sessions are not released yet
    release.set()
    first.join(10)
    second.join(10)
    assert released == [True] and not second.is_alive()
    with pytest.raises(MoqeError, match="clos"):
        rt.submit(_batch(1, 0))
