import json
import shutil

import numpy as np
import pytest

from moqe_compile import Runtime
from moqe_compile.router.fallback import apply_fallback, choose_fallback

from ..models import CROP


def _brute(probs, loss):
    best = loss.mean(0).argmin()
    conf = probs.max(1)
    grid = np.unique(np.concatenate([[0.0], conf, [1.0]]))
    vals = [loss[np.arange(len(loss)), apply_fallback(probs, t, best)[0]].mean() for t in grid]
    return grid, np.array(vals), best


def test_threshold_minimizes_validation_routed_loss():
    rng = np.random.default_rng(0)
    n, K = 300, 3
    loss = rng.uniform(0.4, 0.6, (n, K))
    loss[:, 1] -= 0.05  # expert 1 is the best single expert
    probs = rng.dirichlet(np.ones(K) * 0.7, n)
    # Confident predictions are right (their expert is clearly best); unsure ones are wrong.
    conf, arg = probs.max(1), probs.argmax(1)
    sure = conf > 0.6
    loss[sure, arg[sure]] = 0.1
    loss[~sure, arg[~sure]] = 0.9
    fb = choose_fallback(probs, loss)
    grid, vals, best = _brute(probs, loss)
    assert fb["expert"] == best == 1
    assert fb["val_loss_with_fallback"] == pytest.approx(vals.min())
    assert fb["threshold"] == grid[np.flatnonzero(vals <= vals.min() + 1e-12)[0]]
    assert 0.5 < fb["threshold"] <= 0.61 + 1e-9
    assert fb["val_loss_with_fallback"] < fb["val_routed_loss"]
    assert fb["val_fallback_share"] == pytest.approx((conf < fb["threshold"]).mean())


def test_no_fallback_when_the_router_is_always_right_and_all_when_always_wrong():
    probs = np.array([[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.4, 0.35, 0.25]])
    right = np.full((4, 3), 1.0)
    right[np.arange(4), probs.argmax(1)] = 0.0
    assert choose_fallback(probs, right)["threshold"] == 0.0
    wrong = np.full((4, 3), 0.5)
    wrong[:, 2] = 0.4  # expert 2 best everywhere; the router picks it only on one input
    wrong[np.arange(4), probs.argmax(1)] = np.where(probs.argmax(1) == 2, 0.4, 1.0)
    fb = choose_fallback(probs, wrong)
    assert fb["expert"] == 2 and fb["val_loss_with_fallback"] == pytest.approx(0.4)
    # The wrongly routed input with confidence 0.7 (the highest) must fall back too: t = 1.
    assert fb["threshold"] == 1.0 and fb["val_fallback_share"] == 1.0
    idx, conf = apply_fallback(probs, fb["threshold"], 2)
    assert (idx == 2).all() and np.allclose(conf, probs.max(1))


def _edit(root, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m["routing"])
    (root / "manifest.json").write_text(json.dumps(m))


def test_runtime_applies_the_manifest_threshold(tiny_bundle, tmp_path):
    x = np.random.default_rng(0).normal(size=(16, 3, CROP, CROP)).astype(np.float32)
    with Runtime.load(tiny_bundle) as rt:
        assert "fallback_threshold" in rt.manifest["routing"]
        probs = rt._router.run(x)
    ref_idx, ref_conf = probs.argmax(1), probs.max(1)

    every = tmp_path / "all"
    shutil.copytree(tiny_bundle, every)
    _edit(every, lambda r: r.update(fallback_threshold=1.0, fallback_expert="pct"))
    with Runtime.load(every) as rt:
        idx, conf = rt.route(x)
        res = rt.run(x)
        assert (idx == rt.expert_names.index("pct")).all() and res.experts == ["pct"] * 16
        np.testing.assert_allclose(conf, ref_conf, rtol=1e-6)  # confidence stays the router's
        assert res.fell_back.all()

    half = tmp_path / "half"
    shutil.copytree(tiny_bundle, half)
    t = float(np.median(ref_conf))
    _edit(half, lambda r: r.update(fallback_threshold=t, fallback_expert="entropy"))
    with Runtime.load(half) as rt:
        idx, _ = rt.route(x)
        k = rt.expert_names.index("entropy")
        np.testing.assert_array_equal(idx, np.where(ref_conf < t, k, ref_idx))

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    _edit(old, lambda r: (r.pop("fallback_threshold"), r.pop("fallback_expert")))
    with Runtime.load(old) as rt:  # bundles from before the fallback: plain argmax
        idx, conf = rt.route(x)
        np.testing.assert_array_equal(idx, ref_idx)
        assert not rt.run(x).fell_back.any()


def test_router_runs_on_few_threads_for_small_batches_only(tiny_bundle):
    x = np.random.default_rng(1).normal(size=(5, 3, CROP, CROP)).astype(np.float32)
    with Runtime.load(tiny_bundle) as rt:
        calls = []
        for which in ("small", "large"):
            s = getattr(rt._router, which)
            s.run = (lambda f, w: (lambda b: (calls.append((w, len(b))), f(b))[1]))(s.run, which)
        rt.route(x[:1])
        rt.route(x[:2])
        rt.route(x)
        assert calls == [("small", 1), ("small", 2), ("large", 5)]
    with Runtime.load(tiny_bundle, router_threads=0) as rt:  # same as the experts': one session
        assert rt._router.small is None and rt.route(x)[0].shape == (5,)
