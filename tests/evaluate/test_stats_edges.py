"""Edges of the statistics: argument checks and their messages, the smallest valid inputs,
and values small enough to work out by hand."""

import numpy as np
import pytest

from moqe_compile.evaluate import stats


@pytest.mark.parametrize("call,match", [
    (lambda: stats.bootstrap_means(np.zeros((2, 2, 2))), r"expected a vector \(n,\) or a matrix \(m, n\) of "
                                                         r"per-sample values; got shape \(2, 2, 2\)"),
    (lambda: stats.bootstrap_means([]), "^cannot bootstrap an empty sample.$"),
    (lambda: stats.bootstrap_means([1.0], n_boot=0), "^n_boot = 0 must be >= 1.$"),
    (lambda: stats.bootstrap_means([1.0, 2.0], groups=[0]), "^groups has 1 labels for 2 samples.$"),
    (lambda: stats.bootstrap_ci(np.zeros((2, 3))), r"^expected a vector of per-sample values; got shape \(2, 3\)"),
    (lambda: stats.paired_bootstrap([1, 2], [1, 2, 3]), r"same 1-D shape; got \(2,\) and \(3,\)"),
    (lambda: stats.paired_bootstrap(np.zeros((2, 2)), np.zeros((2, 2))), r"same 1-D shape; got \(2, 2\) and"),
    (lambda: stats.mcnemar_exact([1, 0], [1, 0, 1]), r"same 1-D shape; got \(2,\) and \(3,\)"),
    (lambda: stats.mcnemar_exact(np.ones((2, 2)), np.ones((2, 2))), r"same 1-D shape; got \(2, 2\)"),
    (lambda: stats.mcnemar_exact([1, 2], [1, 0]), r"^a_correct must hold only 0/1 \(or booleans\)"),
    (lambda: stats.mcnemar_exact([1, 0], [0, 2]), r"^b_correct must hold only 0/1 \(or booleans\)"),
    (lambda: stats.percentile_interval(np.arange(5.0), 0.0), r"^level = 0.0 must be in \(0, 1\).$"),
    (lambda: stats.percentile_interval(np.arange(5.0), 1.0), r"^level = 1.0 must be in \(0, 1\).$"),
    (lambda: stats.percentile_interval(np.arange(5.0), 1.5), "level = 1.5"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_one_sample_and_one_resample_are_enough():
    np.testing.assert_array_equal(stats.bootstrap_means([3.0], n_boot=4), [3.0] * 4)
    assert stats.bootstrap_means([1.0, 2.0], n_boot=1).shape == (1,)


def test_percentile_interval_by_hand():
    r = np.arange(101.0)  # quantile q of 0..100 is 100 q
    assert stats.percentile_interval(r, 0.5) == (25.0, 75.0)
    assert stats.percentile_interval(r, 0.9) == pytest.approx((5.0, 95.0))


def test_bootstrap_p_value_by_hand():
    # |r - 1| = 1, 0, 1, 2: three are at least as far from 1 as 1 is from 0 -> (1 + 3) / (4 + 1).
    assert stats.bootstrap_p_value(1.0, [0.0, 1.0, 2.0, 3.0]) == pytest.approx(0.8)
    # The tolerance is 1e-12 relative to |observed| (at least 1e-12): inside it counts, outside not.
    assert stats.bootstrap_p_value(1.0, [2.0 - 1.5e-12]) == 0.5
    assert stats.bootstrap_p_value(1.0, [2.0 - 0.5e-12]) == 1.0
    assert stats.bootstrap_p_value(4.0, [8.0 - 2e-12]) == 1.0
    assert stats.bootstrap_p_value(0.0, [1e-13, -1e-13]) == 1.0


def test_binomial_p_values_by_hand():
    assert stats.binomial_two_sided_p(0, 0) == 1.0
    assert stats.binomial_two_sided_p(0, 3) == pytest.approx(2 / 8)  # 2 * P(X = 0)
    assert stats.binomial_two_sided_p(1, 4) == pytest.approx(2 * 5 / 16)


def test_the_keys_of_the_paired_results():
    m = stats.mcnemar_exact([1, 0, 1], [0, 0, 1])
    assert m == {"p_value": 1.0, "a_only": 1, "b_only": 0, "test": "mcnemar", "n": 3}
    r = stats.paired_bootstrap([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], n_boot=50)
    assert set(r) == {"diff", "ci95", "p_value", "test", "n"} and r["n"] == 3 and r["test"] == "paired-bootstrap"


def test_seed_and_groups_reach_the_resampling():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(size=40)
    r1, r2 = stats.paired_bootstrap(a, b, 300, seed=5), stats.paired_bootstrap(a, b, 300, seed=5)
    assert r1 == r2 and r1["ci95"] != stats.paired_bootstrap(a, b, 300, seed=6)["ci95"]
    c1 = stats.paired_compare(a, b, 300, seed=5)
    assert c1 == stats.paired_compare(a, b, 300, seed=5) and c1["ci95"] != stats.paired_compare(a, b, 300, 6)["ci95"]
    # Clusters of one repeated value: the cluster bootstrap of the repeats is the plain bootstrap
    # of the cluster values (with the same seed), whichever function is asked.
    v = rng.normal(size=12)
    x, groups = np.repeat(v, 4), np.repeat(np.arange(12), 4)
    plain = stats.paired_bootstrap(v, np.zeros(12), 400, seed=2)
    clustered = stats.paired_bootstrap(x, np.zeros(48), 400, seed=2, groups=groups)
    assert clustered["ci95"] == pytest.approx(plain["ci95"]) and clustered["p_value"] == plain["p_value"]
    assert stats.paired_compare(x, np.zeros(48), 400, seed=2, groups=groups)["ci95"] == pytest.approx(plain["ci95"])
    assert stats.bootstrap_ci(x, 400, seed=2, groups=groups)[1] == pytest.approx(stats.bootstrap_ci(v, 400, seed=2)[1])
