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


@pytest.mark.parametrize("kind", ["smoothquant", "awq"])
def test_scaling_keeps_the_fp_function(tiny, kind):
    import torch

    from moqe_compile.tasks.causal_lm.smoothing import awq, smoothquant

    model, _ = tiny
    ids = np.random.default_rng(0).integers(0, 64, (3, 16))
    new = smoothquant(model, ids, 0.85) if kind == "smoothquant" else awq(model, ids, 4, 32, True, grid=4)
    x = torch.from_numpy(ids)
    with torch.no_grad():
        a, b = model(x).logits, new(x).logits
    assert torch.allclose(a, b, atol=1e-3)
    # Some layer was rescaled (AWQ's grid may keep scale 1 where that quantizes best).
    old, changed = dict(model.named_parameters()), dict(new.named_parameters())
    assert any(not torch.equal(old[n], changed[n]) for n in old if n.endswith("proj.weight"))
