import threading

import numpy as np
import pytest

from moqe_compile import Runtime
from moqe_compile.errors import BackendError, InputError

from ..models import CROP


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    with Runtime.load(tiny_bundle) as r:
        yield r


def _batch(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, CROP, CROP)).astype(np.float32)


def test_grouped_dispatch_equals_per_sample_expert(rt):
    x = _batch(24)
    res = rt.run(x)
    assert res.logits.shape == (24, 4) and len(res.experts) == 24
    assert np.all((res.confidence > 0) & (res.confidence <= 1))
    # Each sample's output is exactly what its chosen expert gives it alone (order kept).
    for i in range(24):
        solo = rt.run_expert(res.experts[i], x[i : i + 1])[0]
        np.testing.assert_allclose(res.logits[i], solo, rtol=1e-5, atol=1e-5)
    idx, _ = rt.route(x)
    assert [rt.expert_names[k] for k in idx] == res.experts


def test_forced_mixed_routing_keeps_order(rt, monkeypatch):
    # Make the grouping path non-trivial even if the tiny router prefers one expert.
    x = _batch(10, seed=1)
    forced = np.array([0, 1, 2, 0, 2, 1, 1, 0, 2, 2])
    monkeypatch.setattr(rt, "route", lambda b: (forced, np.ones(len(b), np.float32)))
    res = rt.run(x)
    for i, k in enumerate(forced):
        np.testing.assert_allclose(res.logits[i], rt.run_expert(rt.expert_names[k], x[i : i + 1])[0],
                                   rtol=1e-5, atol=1e-5)


def test_threads_give_serial_results(rt):
    batches = [_batch(1 + i % 5, seed=i) for i in range(24)]
    serial = [rt.run(b) for b in batches]
    results = [None] * len(batches)

    def work(j):
        for i in range(j, len(batches), 4):
            results[i] = rt.run(batches[i])

    ts = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for a, b in zip(serial, results):
        np.testing.assert_array_equal(a.logits, b.logits)
        assert a.experts == b.experts


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 3, 8, 8), np.float32), r"shape \(2, 3, 8, 8\); expected \(N, 3, 32, 32\)"),
    (np.zeros((2, 3, CROP, CROP), np.float64), "dtype float64; expected float32"),
    (np.zeros((0, 3, CROP, CROP), np.float32), "batch is empty"),
])
def test_bad_batches(rt, bad, match):
    with pytest.raises(InputError, match=match):
        rt.run(bad)


def test_unknown_backend(tiny_bundle):
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        Runtime.load(tiny_bundle, backend="tpu")
