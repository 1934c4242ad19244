"""bench/moe_train.py's resumable loop on a tiny Mixtral and random tokens (no corpus): an
interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted
one, and the early-stopping rule stops where a hand count says it should."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.models import tiny_moe_config

torch = pytest.importorskip("torch")

_spec = importlib.util.spec_from_file_location(
    "moe_train", Path(__file__).resolve().parents[1] / "bench" / "moe_train.py")
moe_train = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("moe_train", moe_train)  # dataclasses look their module up there
_spec.loader.exec_module(moe_train)

CFG = moe_train.TrainConfig(max_steps=4, batch=2, lr=1e-2, warmup=2, min_lr_ratio=0.1, eval_every=2,
                            patience=0, balance=0.05, checkpoint_every=100)


def _data():
    rng = np.random.default_rng(1)
    return rng.integers(0, 64, (7, 16)), rng.integers(0, 64, (3, 16))  # 7 windows: the order reshuffles


def _model():
    from transformers import MixtralForCausalLM

    torch.manual_seed(CFG.seed)
    return MixtralForCausalLM._from_config(tiny_moe_config("mixtral"), experts_implementation="eager")


def _run(ckdir, stop_after=None):
    torch.set_num_threads(1)
    m = _model()
    st = moe_train.train(m, *_data(), CFG, ckdir, stop_after=stop_after, say=lambda s: None)
    return m, st


def test_interrupted_and_resumed_run_equals_the_straight_run(tmp_path):
    straight, st_a = _run(tmp_path / "a")
    _, st_half = _run(tmp_path / "b", stop_after=3)  # past an evaluation, mid-epoch
    assert st_half.step == 3 and not st_half.stop_reason
    resumed, st_b = _run(tmp_path / "b")
    assert st_b.step == st_a.step == 4 and st_b.starts == 2
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    init = _model().state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for key in ("val_loss", "train_loss", "share"):  # train_loss: its running sum survives the interruption
        assert [r[key] for r in st_a.curve] == [r[key] for r in st_b.curve], key
    assert [r["step"] for r in st_b.curve] == [2, 4]
    ck = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    assert sorted(ck["gate_snapshots"]) == [2, 4]
    assert not list((tmp_path / "b").glob("*.tmp"))


def test_curve_prints_every_evaluation(tmp_path, capsys):
    _run(tmp_path / "checkpoint")
    assert moe_train.main(["--out", str(tmp_path), "--curve"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [2, 4]


def test_resume_refuses_other_settings(tmp_path):
    _run(tmp_path, stop_after=1)
    m = _model()
    with pytest.raises(SystemExit, match="other settings"):
        moe_train.train(m, *_data(), moe_train.TrainConfig(**{**moe_train.asdict(CFG), "lr": 2e-2}), tmp_path,
                        say=lambda s: None)


def test_shares_and_balance_loss_per_layer():
    x = torch.from_numpy(_data()[0][:2])
    ce, bal, counts = moe_train.losses(_model(), x)
    assert counts.shape == (2, 4) and counts.sum() == 2 * 2 * 16 * 2  # layers x tokens x top-2
    assert 1.0 <= float(bal.detach()) <= 4.0  # E sum f P: 1 balanced, E when one expert takes every pick
    one_sided = torch.tensor([[9.0, 0.0, 0.0, -9.0]] * 16)
    assert float(moe_train.switch_balance(one_sided, 2)) == pytest.approx(2.0, rel=1e-3)  # f = (.5,.5,0,0), P ~ (1,0,0,0)


@pytest.mark.parametrize("ppl, stops", [
    ([100, 90, 89.9, 89.8, 89.7], True),   # 3 evaluations after 90 none reaches 90 * 0.99
    ([100, 90, 89.9, 89.0, 88.9], False),  # 89.0 < 89.1: the count restarts from there
    ([100, 90, 95, 96], False),            # only 2 since the best
    ([100, 101, 102, 103], True),
])
def test_plateau_rule(ppl, stops):
    assert moe_train.plateau(ppl, 0.01, 3) is stops


def test_lr_schedule_warms_up_and_ends_at_the_floor():
    c = moe_train.TrainConfig(max_steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert moe_train.lr_at(c, 0) == pytest.approx(0.1, abs=0.01)
    assert moe_train.lr_at(c, 100) == pytest.approx(0.1)
    assert moe_train.lr_at(c, 50) == pytest.approx(0.55)
