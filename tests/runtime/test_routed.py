"""``Runtime.run`` and ``submit`` on the routed bundle, checked against its construction: the
expert of each sample from ``routed_oracle`` (numpy), its logits from that expert's graph run
alone in plain onnxruntime (``routed_reference``), never from moqe's own dispatch."""

import threading

import numpy as np
import pytest

from moqe_compile import Runtime
from moqe_compile.runtime import DynamicBatcher, QueueConfig

from ..models import CROP, ROUTED_EXPERTS, ROUTED_THRESHOLD, class_batch, routed_oracle, routed_reference

# Logits are O(1..10) and come from a 1024-term float32 mean and a 3-term dot product; the
# runtime runs them per expert group, the reference per sample, so only the summation order
# may differ: a few float32 ulps (~1e-6 relative). 1e-5 leaves room for that and nothing else
# (two experts' logits differ by O(1)).
RTOL = ATOL = 1e-5
# The router's confidence in float32 (ONNX) against float64 (numpy): a softmax of values
# below 100 differs by ~1e-6 at most.
CONF_ATOL = 1e-5


def mixed_batch(n: int, seed: int) -> np.ndarray:
    """Gaussian inputs that reach every expert and the fallback, none of them so close to the
    threshold that float32 rounding could decide."""
    x = np.random.default_rng(seed).normal(size=(n, 3, CROP, CROP)).astype(np.float32)
    idx, conf, low = routed_oracle(x)
    assert set(idx[~low]) == {0, 1, 2} and low.any(), "the batch must exercise every route"
    assert np.abs(conf - ROUTED_THRESHOLD).min() > 10 * CONF_ATOL
    return x


def assert_routed_like_reference(root, x, res):
    idx, conf, logits = routed_reference(root, x)
    np.testing.assert_array_equal(res.expert_index, idx)
    assert list(res.experts) == [ROUTED_EXPERTS[k] for k in idx]
    np.testing.assert_allclose(res.confidence, conf, atol=CONF_ATOL)
    np.testing.assert_allclose(res.logits, logits, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def rt(routed_bundle):
    with Runtime.load(routed_bundle) as r:
        yield r


def test_run_sends_each_sample_to_its_constructed_expert(rt, routed_bundle):
    x = mixed_batch(40, seed=0)
    res = rt.run(x)
    assert_routed_like_reference(routed_bundle, x, res)
    np.testing.assert_array_equal(res.fell_back, routed_oracle(x)[2])


def test_class_images_route_by_colour(rt):
    x, y = class_batch(12, seed=3)
    res = rt.run(x)
    # class c lights channel c % 3; the router picks the brightest channel's expert, sure of it
    np.testing.assert_array_equal(res.expert_index, y % 3)
    assert (res.confidence > 0.99).all() and not res.fell_back.any()


def test_route_alone_agrees_with_run(rt):
    x = mixed_batch(24, seed=1)
    idx, conf = rt.route(x)
    np.testing.assert_array_equal(idx, routed_oracle(x)[0])
    np.testing.assert_allclose(conf, routed_oracle(x)[1], atol=CONF_ATOL)


def test_submit_with_several_workers_answers_each_request(routed_bundle):
    xs = [mixed_batch(40, seed=5)[i:i + 1 + i % 3] for i in range(30)]
    q = QueueConfig(max_batch=8, max_delay_ms=5, max_queue=64, workers=3)
    got = [None] * len(xs)
    with Runtime.load(routed_bundle, queue=q) as rt:

        def client(j):  # 4 threads submit, 3 workers merge and run
            for i in range(j, len(xs), 4):
                got[i] = rt.submit(xs[i]).result(60)

        ts = [threading.Thread(target=client, args=(j,)) for j in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    for x, res in zip(xs, got):
        assert len(res) == len(x)
        assert_routed_like_reference(routed_bundle, x, res)


def test_workers_run_batches_concurrently():
    # Each run waits until two runs are in progress at once: with fewer than two workers the
    # barrier breaks (after a generous 20 s) and the requests fail.
    barrier = threading.Barrier(2, timeout=20)

    def run(x):
        barrier.wait()
        return x + 1

    b = DynamicBatcher(run, lambda r, s, e: r[s:e], max_batch=1, max_delay_ms=0, workers=2)
    futs = [b.submit(np.full((1, 1), i, np.float32)) for i in range(2)]
    assert [float(f.result(60)[0, 0]) for f in futs] == [1.0, 2.0]
    b.close()


def test_a_full_batch_runs_without_waiting_for_the_delay_and_a_lone_request_within_it():
    seen = []
    b = DynamicBatcher(lambda x: x, lambda r, s, e: r[s:e], max_batch=4, max_delay_ms=600_000, max_queue=16)
    b.on_batch = lambda res, n, requests: seen.append((n, requests))
    futs = [b.submit(np.zeros((1, 1), np.float32)) for _ in range(4)]
    # Ten minutes of delay, yet the full batch of four runs at once (a wait for the delay
    # would exceed the 60 s given here).
    for f in futs:
        f.result(60)
    assert seen == [(4, 4)]
    b.close()
    # A lone request under a 0.3 s delay is answered once the delay ran out, though the
    # batch never fills (waiting for max_batch would never end).
    b = DynamicBatcher(lambda x: x, lambda r, s, e: r[s:e], max_batch=1000, max_delay_ms=300)
    b.on_batch = lambda res, n, requests: seen.append((n, requests))
    assert b.submit(np.ones((2, 1), np.float32)).result(60).shape == (2, 1)
    assert seen[-1] == (2, 1)
    b.close()
