"""Grouping a routed batch per expert and scattering the outputs back, against per-sample
loops written out here (the oracle never calls dispatch.py)."""

import numpy as np
import pytest

from moqe_compile.runtime.dispatch import group_by_expert, scatter, split_requests


def test_groups_are_ascending_experts_with_their_samples_in_input_order():
    groups = group_by_expert([2, 0, 2, 1, 0, 2])  # a list, not only arrays
    assert [k for k, _ in groups] == [0, 1, 2]
    assert all(type(k) is int for k, _ in groups)
    assert [m.tolist() for _, m in groups] == [[1, 4], [3], [0, 2, 5]]


def test_an_expert_nobody_chose_has_no_group():
    groups = group_by_expert(np.array([3, 3, 1]))
    assert [(k, m.tolist()) for k, m in groups] == [(1, [2]), (3, [0, 1])]


def _per_sample(idx, x, experts):
    """The oracle: run each sample alone through its expert."""
    return np.stack([experts[k](x[i:i + 1])[0] for i, k in enumerate(idx)])


def test_scatter_puts_each_experts_rows_back_where_their_samples_were():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 2, 3)).astype(np.float32)
    experts = [lambda b, k=k: b * (10.0 ** k) + k for k in range(4)]  # distinct per expert
    idx = rng.integers(0, 4, 9)
    groups = group_by_expert(idx)
    out = scatter(groups, [experts[k](x[m]) for k, m in groups], len(idx))
    assert out.shape == (9, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, _per_sample(idx, x, experts))


def test_scatter_keeps_the_first_outputs_dtype_and_trailing_shape():
    groups = [(0, np.array([1])), (5, np.array([0, 2]))]
    outs = [np.array([[7, 8]], np.int16), np.array([[1, 2], [3, 4]], np.int16)]
    out = scatter(groups, outs, 3)
    assert out.dtype == np.int16 and out.tolist() == [[1, 2], [7, 8], [3, 4]]
    # Plain lists are accepted as outputs too.
    assert scatter([(0, np.array([1, 0]))], [[[5.0], [6.0]]], 2).tolist() == [[6.0], [5.0]]


@pytest.mark.parametrize("groups,outputs,match", [
    ([(0, np.array([0]))], [], "1 groups but 0 outputs"),
    ([], [], "0 groups but 0 outputs"),
    ([(0, np.array([0])), (1, np.array([1]))], [np.zeros((1, 2))], "2 groups but 1 outputs"),
    ([(0, np.array([0, 1]))], [np.zeros((3, 2))], "an expert returned 3 rows for 2 samples"),
    ([(0, np.array([0])), (1, np.array([1, 2]))], [np.zeros((1, 2)), np.zeros((1, 2))],
     "an expert returned 1 rows for 2 samples"),
])
def test_scatter_refuses_outputs_that_do_not_fit_the_groups(groups, outputs, match):
    with pytest.raises(ValueError, match=match):
        scatter(groups, outputs, 3)


def _slices_by_hand(sizes):
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


@pytest.mark.parametrize("sizes", [[1], [3], [2, 1], [1, 2, 3], [4, 0, 2], [0, 0, 1]])
def test_split_requests_cuts_the_merged_batch_at_each_requests_size(sizes):
    got = split_requests(sizes)
    assert got == _slices_by_hand(sizes)
    assert all(type(s.start) is int and type(s.stop) is int for s in got)
    merged = np.arange(sum(sizes))
    pieces = [merged[s] for s in got]
    assert [len(p) for p in pieces] == sizes and np.concatenate(pieces).tolist() == merged.tolist()


def test_split_requests_of_no_requests_is_empty():
    assert split_requests([]) == []
