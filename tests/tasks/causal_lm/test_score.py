"""Per-window scoring of LM experts (tasks/causal_lm/score.py) against the plain formulas."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")


def _reference(fp, experts, ids):
    """Loss, KL to FP and top-1 agreement, written out with fresh arrays per step (how the build
    scored before the in-place log-softmax): the scorer must give the very same numbers."""
    from moqe_compile.evaluate.losses import log_softmax

    loss, kl, agree = (np.zeros((len(ids), len(experts))) for _ in range(3))
    nll = np.zeros(len(ids))
    for i, row in enumerate(ids):
        x = row[None]
        flp = log_softmax(fp.logits(x)[:, :-1], dtype=None)
        nll[i] = -np.take_along_axis(flp, x[:, 1:, None], -1).mean()
        for j, e in enumerate(experts):
            elp = log_softmax(e.logits(x)[:, :-1], dtype=None)
            loss[i, j] = -np.take_along_axis(elp, x[:, 1:, None], -1)[..., 0].astype(np.float64).mean()
            kl[i, j] = (np.exp(flp) * (flp - elp)).sum(-1, dtype=np.float64).mean()
            agree[i, j] = (elp.argmax(-1) == flp.argmax(-1)).mean()
    return nll, loss, kl, agree


def test_scores_equal_the_plain_formulas_and_detail_only_where_asked(lm_bundle):
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime
    from moqe_compile.tasks.causal_lm.score import score_windows

    with LMRuntime.load(lm_bundle[0]) as rt, np.load(rt.bundle.file("report/eval_data.npz")) as z:
        ids = z["test_ids"][:3]
        fp, experts = rt.session("fp"), [rt.session(n) for n in rt.expert_names]
        nll, loss, kl, agree = _reference(fp, experts, ids)
        full = score_windows(fp, experts, ids)
        part = score_windows(fp, experts, ids, mix_of=0, detail_of=1)
        no_fp = score_windows(None, experts, ids, mix_of=0)
    np.testing.assert_array_equal(full.nll, nll)
    np.testing.assert_array_equal(full.loss, loss)
    np.testing.assert_array_equal(full.kl, kl)
    np.testing.assert_array_equal(full.agree, agree)
    np.testing.assert_array_equal(part.loss, loss)  # the loss of every expert, detail of the first only
    np.testing.assert_array_equal(part.kl[:, :1], kl[:, :1])
    assert np.isnan(part.kl[:, 1:]).all() and np.isnan(part.agree[:, 1:]).all() and part.mix is None
    np.testing.assert_array_equal(no_fp.loss, loss)  # no FP pass: the losses alone, nothing made up
    assert np.isnan(no_fp.nll).all() and np.isnan(no_fp.kl).all() and np.isnan(no_fp.agree).all()
