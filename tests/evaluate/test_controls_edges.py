"""The controls' arithmetic on values worked out by hand: which random mix of two experts
matches MoQE's cost, the copies' summary and vectors, and the copies file's refusal of pickles."""

import numpy as np
import pytest

from moqe_compile.evaluate.controls import Copies, copies_entries, copies_summary, cost_matched, frontier_pair, interpolate


def test_frontier_pair_by_hand():
    # Expected cost 5 between costs 4, 6, 8. (4, 6): weight (6-5)/(6-4) = 0.5 -> 0.5*0.5 + 0.5*0.6 = 0.55;
    # (4, 8): weight 0.75 -> 0.75*0.5 + 0.25*0.68 = 0.545. The better mix is (4, 6).
    scores = {"c4": 0.5, "c6": 0.6, "c8": 0.68}
    assert frontier_pair(["c4", "c6", "c8"], [4, 6, 8], 5.0, scores) == ("c4", "c6", 0.5)
    scores["c8"] = 0.9  # now 0.75*0.5 + 0.25*0.9 = 0.6 > 0.55
    assert frontier_pair(["c4", "c6", "c8"], [4, 6, 8], 5.0, scores) == ("c4", "c8", 0.75)


def test_an_expert_at_exactly_the_expected_cost_may_be_either_side():
    s = {"a": 0.7, "b": 0.2}
    assert frontier_pair(["a", "b"], [5, 6], 5.0, s) == ("a", "a", 1.0)  # equal costs: all weight on one
    assert frontier_pair(["a", "b"], [5, 6], 6.0, s) == ("a", "b", 0.0)
    # Only experts costing at least the expected cost (to 1e-9) can be the costlier side.
    # (b, c): weight (7-6)/(7-5) = 0.5 -> 0.55, better than (a, c): weight 1/3 -> 0.1.
    assert frontier_pair(["a", "b", "c"], [4, 5, 7], 6.0, {"a": 0.1, "b": 1.0, "c": 0.1}) == ("b", "c", 0.5)


def test_ties_keep_the_first_pair_and_no_bracket_is_none():
    assert frontier_pair(["a", "b"], [1, 1], 1.0, {"a": 0.5, "b": 0.5}) == ("a", "a", 1.0)
    assert frontier_pair(["a", "b"], [1, 2], 3.0, {"a": 0.5, "b": 0.5}) is None


def test_cost_matched_chooses_by_lowest_validation_loss_and_names_its_units():
    names, route = ["c4", "c6", "c8"], np.array([0, 0, 1, 2])  # expected (4+4+6+8)/4 = 5.5
    cm = cost_matched(names, {"c4": 4, "c6": 6, "c8": 8}, route, val_loss={"c4": 0.5, "c6": 0.45, "c8": 0.1})
    # (4, 6): w 0.25 -> -(0.25*0.5 + 0.75*0.45) = -0.4625; (4, 8): w 0.625 -> -(0.3125 + 0.0375) = -0.35.
    assert (cm["cheaper"], cm["costlier"], cm["weight_cheaper"]) == ("c4", "c8", 0.625)
    assert cm["cost"] == "mean weight bits" and cm["expert_costs"] == {"c4": 4.0, "c6": 6.0, "c8": 8.0}
    assert cm["moqe_expected_cost"] == 5.5 and cm["chosen_on"] == "val"
    by_split = cost_matched(names, {"c4": 4, "c6": 6, "c8": 8}, route, split_score={"c4": 0, "c6": 1, "c8": 0})
    assert by_split["chosen_on"] == "test" and by_split["costlier"] == "c6"


def test_an_expert_the_router_never_chose_still_counts():
    cm = cost_matched(["a", "b"], {"a": 2, "b": 8}, np.array([0, 0]), {"a": 1.0, "b": 0.0})
    assert cm["moqe_expected_cost"] == 2.0 and cm["cheaper"] == "a"


def test_same_costs_say_so_in_the_default_unit():
    cm = cost_matched(["a", "b"], {"a": 4, "b": 4}, np.array([0, 1]))
    assert cm == {"applicable": False, "cost": "mean weight bits", "expert_costs": {"a": 4.0, "b": 4.0},
                  "moqe_expected_cost": 4.0,
                  "reason": "every expert has the same cost: the best single expert is the cost-matched comparison"}
    none = cost_matched(["a", "b"], {"a": 4, "b": 8}, np.array([0, 1]))
    assert none["reason"] == "no validation losses to choose the bracketing experts on"


def test_interpolate_weights_each_vector():
    cm = {"cheaper": "a", "costlier": "b", "weight_cheaper": 0.25}
    vec = interpolate(cm, {"a": np.array([4.0, 0.0]), "b": np.array([2.0, 8.0])}.get)
    np.testing.assert_allclose(vec, [0.25 * 4 + 0.75 * 2, 0.75 * 8])


def test_copies_router_vector_is_integer_choices():
    loss = [[0.1, 0.3], [0.5, 0.2]]
    got = copies_entries({"names": ["c0", "c1"], "loss": loss, "route": [1.0, 0.0]}, lambda c: c)
    assert got["copies_router"].tolist() == [1, 0] and got["copies_router"].dtype == np.int64


def test_copies_summary_block():
    copies = {"names": np.array(["k0", "k1"]), "best": 1, "preset": "w4"}
    summary = {"copy:k0": {"v": 0}, "copy:k1": {"v": 1}, "copies_oracle": {"value": 0.9, "n": 3}}.__getitem__
    block = copies_summary(copies, "preset", summary, {"diff": 0.1})
    assert block == {"preset": "w4", "copies": 2, "best_copy": "k1", "best_copy_chosen_on": "val",
                     "copies_metrics": {"k0": {"v": 0}, "k1": {"v": 1}}, "value": 0.9, "n": 3,
                     "oracle_gain": {"diff": 0.1}}


def test_copies_file_keys_and_no_pickles(tmp_path):
    c = Copies(["c0"], "p", 0, 5, {"val": {"loss": np.ones((2, 1)), "pred": np.array([[3], [4]]), "route": None}})
    c.save(tmp_path / "c.npz")
    back = Copies.load(tmp_path / "c.npz")
    assert back.splits["val"]["pred"].tolist() == [[3], [4]]
    assert back.for_split("val")["preset"] == "p" and back.for_split("val")["best"] == 0
    np.savez(tmp_path / "evil.npz", names=np.array([{"x": 1}], dtype=object), preset=np.array("p"), best=np.array(0),
             calibration_per_copy=np.array(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        Copies.load(tmp_path / "evil.npz")
