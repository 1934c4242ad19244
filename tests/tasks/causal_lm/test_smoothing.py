"""SmoothQuant and AWQ rescaling keep the FP function."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from ...models import make_tiny_lm  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from moqe_compile.tasks.causal_lm.model import load_causal_lm

    d = make_tiny_lm(tmp_path_factory.mktemp("m") / "model")
    return load_causal_lm("transformers", str(d))


@pytest.mark.parametrize("kind", ["smoothquant", "smoothquant-all", "awq"])
def test_scaling_keeps_the_fp_function(tiny, kind):
    import torch

    from moqe_compile.tasks.causal_lm.smoothing import awq, smoothquant

    model, _ = tiny
    ids = np.random.default_rng(0).integers(0, 64, (3, 16))
    new = (awq(model, ids, 4, 32, True, grid=4, clip=False) if kind == "awq"
           else smoothquant(model, ids, 0.85, "all" if kind == "smoothquant-all" else "norms"))
    x = torch.from_numpy(ids)
    with torch.no_grad():
        a, b = model(x).logits, new(x).logits
    assert torch.allclose(a, b, atol=1e-3)
    # Some layer was rescaled (AWQ's grid may keep scale 1 where that quantizes best).
    old, changed = dict(model.named_parameters()), dict(new.named_parameters())
    assert any(not torch.equal(old[n], changed[n]) for n in old if n.endswith("proj.weight"))


def test_awq_scales_every_group_and_its_clip_only_shrinks_weights(tiny):
    import torch

    from moqe_compile.tasks.causal_lm.smoothing import _awq_groups, awq

    model, _ = tiny
    ids = np.random.default_rng(0).integers(0, 64, (3, 16))
    # GQA (4 query / 2 kv heads): v -> o is skipped; q/k/v, gate/up and up -> down per layer.
    assert len(_awq_groups(model)) == 3 * 2
    scaled, clipped = awq(model, ids, 4, 32, True, grid=4, clip=False), awq(model, ids, 4, 32, True, grid=4)
    assert len(scaled._moqe_awq_alphas) == 6  # noqa: SLF001
    p, c = dict(scaled.named_parameters()), dict(clipped.named_parameters())
    for n in p:
        if n.endswith(("q_proj.weight", "k_proj.weight")) or "proj" not in n:
            assert torch.equal(p[n], c[n]), n  # q/k and the norms are never clipped
        else:  # clipping keeps each weight or moves it towards 0
            assert (c[n].abs() <= p[n].abs() + 1e-7).all() and torch.all((c[n] == p[n]) | (c[n] * p[n] >= 0))
    assert any(not torch.equal(p[n], c[n]) for n in p if n.endswith("down_proj.weight"))


def test_smoothquant_all_groups_also_smooths_down_proj(tiny):
    import torch

    from moqe_compile.tasks.causal_lm.smoothing import smoothquant

    model, _ = tiny
    ids = np.random.default_rng(0).integers(0, 64, (3, 16))
    old = dict(model.named_parameters())
    norms = dict(smoothquant(model, ids, 0.5, "norms").named_parameters())
    every = dict(smoothquant(model, ids, 0.5, "all").named_parameters())
    downs = [n for n in old if n.endswith("down_proj.weight")]
    assert downs and all(torch.equal(old[n], norms[n]) for n in downs)  # the paper's groups leave down alone
    assert all(not torch.equal(old[n], every[n]) for n in downs)
    # up_proj's output rows absorb the inverse scale of down_proj's input columns.
    ups = [n for n in old if n.endswith("up_proj.weight")]
    assert all(not torch.equal(norms[n], every[n]) for n in ups)
