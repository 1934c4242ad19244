"""Known answers for the bootstrap and the paired tests."""

import numpy as np
import pytest

from moqe_compile.evaluate import stats


def _table(a_only, b_only, both=0, neither=0):
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither)
    return a, b


@pytest.mark.parametrize("a_only,b_only,p", [
    (2, 8, 2 * (1 + 10 + 45) / 2**10),  # P(X <= 2), X ~ Bin(10, 1/2), doubled = 0.109375
    (0, 6, 2 / 2**6),                  # all six discordant pairs one way: 2 * 0.5**6
    (5, 5, 1.0),                       # balanced
    (3, 4, 1.0),                       # 2 * P(X <= 3 | n = 7) = 2 * 64/128 -> capped at 1
    (1, 11, 2 * (1 + 12) / 2**12),
])
def test_mcnemar_exact_known_p(a_only, b_only, p):
    a, b = _table(a_only, b_only, both=40, neither=7)  # concordant pairs do not matter
    m = stats.mcnemar_exact(a, b)
    assert m["a_only"] == a_only and m["b_only"] == b_only and m["n"] == a_only + b_only + 47
    assert m["p_value"] == pytest.approx(p, rel=1e-12)
    assert stats.mcnemar_exact(b, a)["p_value"] == pytest.approx(p, rel=1e-12)  # symmetric


def test_mcnemar_no_discordant_pairs_is_p1():
    a, b = _table(0, 0, both=10, neither=3)
    assert stats.mcnemar_exact(a, b)["p_value"] == 1.0


def test_mcnemar_rejects_non_binary():
    with pytest.raises(ValueError, match="only 0/1"):
        stats.mcnemar_exact([0.5, 1.0], [1, 0])


def test_identical_vectors_diff_zero_p_one():
    x = np.random.default_rng(0).normal(size=200)
    r = stats.paired_bootstrap(x, x.copy())
    assert r["diff"] == 0.0 and r["ci95"] == [0.0, 0.0] and r["p_value"] == 1.0
    c = (np.random.default_rng(1).random(200) < 0.7).astype(int)
    r = stats.paired_compare(c, c.copy())
    assert r["test"] == "mcnemar" and r["diff"] == 0.0 and r["ci95"] == [0.0, 0.0] and r["p_value"] == 1.0


def test_constant_vector_has_degenerate_interval():
    v, (lo, hi) = stats.bootstrap_ci(np.ones(30))
    assert v == lo == hi == 1.0


def test_bernoulli_ci_coverage():
    """95% percentile intervals of a Bernoulli(0.3) mean, n = 200, cover the truth ~95% of the time."""
    rng = np.random.default_rng(42)
    p, n, trials = 0.3, 200, 400
    data = (rng.random((trials, n)) < p).astype(float)
    boot = stats.bootstrap_means(data, n_boot=2000, seed=7)  # (2000, trials)
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
    coverage = ((lo <= p) & (p <= hi)).mean()
    assert 0.90 <= coverage <= 0.99, coverage
    # The interval's width is about 2 * 1.96 * sqrt(p(1-p)/n) = 0.127.
    assert np.median(hi - lo) == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.1)


def test_paired_bootstrap_detects_a_real_shift_and_not_noise():
    rng = np.random.default_rng(3)
    b = rng.normal(size=300)
    shifted = stats.paired_bootstrap(b + 0.3 + 0.1 * rng.normal(size=300), b, n_boot=4000)
    assert shifted["diff"] == pytest.approx(0.3, abs=0.03)
    assert shifted["ci95"][0] > 0.25 and shifted["p_value"] == pytest.approx(1 / 4001)  # the smallest p possible
    noise = stats.paired_bootstrap(b + 0.1 * rng.normal(size=300), b, n_boot=4000)
    assert noise["ci95"][0] < 0 < noise["ci95"][1] and noise["p_value"] > 0.05


def test_seeded_and_paired_across_vectors():
    X = np.random.default_rng(0).normal(size=(3, 50))
    m = stats.bootstrap_means(X, n_boot=500, seed=11)
    assert m.shape == (500, 3)
    np.testing.assert_allclose(m[:, 1], stats.bootstrap_means(X[1], n_boot=500, seed=11))  # same resamples
    np.testing.assert_array_equal(m, stats.bootstrap_means(X, n_boot=500, seed=11))  # reproducible
    assert not np.array_equal(m, stats.bootstrap_means(X, n_boot=500, seed=12))
    # Chunked resampling (many resamples of a long vector) gives the right mean and spread.
    big = np.random.default_rng(1).normal(size=50_000)
    r = stats.bootstrap_means(big, n_boot=300, seed=0)
    assert r.mean() == pytest.approx(big.mean(), abs=3 * big.std() / np.sqrt(50_000))
    assert r.std() == pytest.approx(big.std() / np.sqrt(50_000), rel=0.2)


def test_mcnemar_is_used_for_binary_and_bootstrap_otherwise():
    a, b = _table(2, 8, both=20)
    r = stats.paired_compare(a, b, n_boot=1000)
    assert r["test"] == "mcnemar" and r["p_value"] == pytest.approx(0.109375)
    assert r["diff"] == pytest.approx(-6 / 30) and r["discordant"] == {"a_only": 2, "b_only": 8}
    assert stats.paired_compare(a + 0.5, b, n_boot=1000)["test"] == "paired-bootstrap"


def test_cluster_bootstrap_equals_bootstrap_of_cluster_values():
    """Clusters of equal size holding one value each: resampling clusters = resampling their values."""
    v = np.random.default_rng(5).normal(size=12)
    x = np.repeat(v, 5)
    groups = np.repeat([f"img{i}" for i in range(12)], 5)
    np.testing.assert_allclose(stats.bootstrap_means(x, 800, seed=4, groups=groups),
                               stats.bootstrap_means(v, 800, seed=4), rtol=1e-12)
    # Singleton clusters are the plain bootstrap.
    np.testing.assert_allclose(stats.bootstrap_means(x, 300, seed=1, groups=np.arange(60)),
                               stats.bootstrap_means(x, 300, seed=1), rtol=1e-12)


def test_cluster_bootstrap_is_wider_for_correlated_views_and_drops_mcnemar():
    rng = np.random.default_rng(0)
    src = (rng.random(10) < 0.5).astype(float)  # 10 photos, 20 identical-outcome views each
    a = np.repeat(src, 20)
    groups = np.repeat(np.arange(10), 20)
    _, (lo_iid, hi_iid) = stats.bootstrap_ci(a, 2000)
    _, (lo_cl, hi_cl) = stats.bootstrap_ci(a, 2000, groups=groups)
    assert hi_cl - lo_cl > 2.5 * (hi_iid - lo_iid)  # ~sqrt(20) wider
    b = np.repeat((rng.random(10) < 0.5).astype(float), 20)
    assert stats.paired_compare(a, b, 500)["test"] == "mcnemar"
    assert stats.paired_compare(a, b, 500, groups=groups)["test"] == "paired-bootstrap"
    assert stats.paired_compare(a, b, 500, groups=np.arange(200))["test"] == "mcnemar"  # singletons: independent
