"""True-sequential GPTQ's per-stage Hessians, against the inputs a plain full forward feeds
each projection."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from ...models import make_tiny_lm  # noqa: E402


def test_stage_hessians_equal_those_of_a_full_forward(tmp_path):
    import torch

    from moqe_compile.tasks.causal_lm.model import load_causal_lm
    from moqe_compile.tasks.causal_lm.sequential import STAGES, _hessians, _layer_inputs

    model, _ = load_causal_lm("transformers", str(make_tiny_lm(tmp_path / "model")))
    ids = np.random.default_rng(0).integers(3, 64, (3, 16))
    layer = model.model.layers[0]
    names = [n for stage in STAGES for n in stage]
    seen = {n: [] for n in names}  # oracle: every projection's input on an uncut run of the whole model
    hooks = [layer.get_submodule(n).register_forward_pre_hook(
        lambda _m, inp, n=n: seen[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).double().numpy()))
        for n in names]
    with torch.no_grad():
        for row in ids:
            model(input_ids=torch.from_numpy(row[None]), use_cache=False)
    for h in hooks:
        h.remove()
    inputs = _layer_inputs(model, ids)
    for stage in STAGES:
        got = _hessians(layer, {n: layer.get_submodule(n) for n in stage}, inputs)
        for n in stage:
            x = np.concatenate(seen[n])
            np.testing.assert_allclose(got[n], x.T @ x / len(x), rtol=1e-6, atol=1e-9)
