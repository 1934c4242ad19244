"""Expert-wise bits for sparse MoE models without a build: layouts found, criteria, widths per
layer, controls, the gate-norm fallback, torch fake-quant (tasks/causal_lm/moe_bits.py, moe.py)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from moqe_compile.errors import BuildError, ConfigError  # noqa: E402
from moqe_compile.tasks.causal_lm.moe_bits import (  # noqa: E402
    allocate,
    combined_order,
    gate_norm_change,
    load_gate_history,
    max_intra_neuron_variance,
    width_counts,
)

from ...models import MOE_LAYOUTS as LAYOUTS
from ...models import make_tiny_moe  # noqa: E402


@pytest.mark.parametrize(("avg", "widths", "counts"), [
    (2.5, [2, 3, 4], {2: 4, 3: 4, 4: 0}),  # the authors' three-level policy, 8 experts
    (3.0, [2, 3, 4], {2: 2, 3: 4, 4: 2}),
    (3.5, [2, 3, 4], {2: 2, 3: 0, 4: 6}),
    (5.0, [4, 8], {4: 6, 8: 2}),
    (4.0, [4, 8], {4: 8, 8: 0}),
    (3.0, [2, 4, 8], {2: 4, 4: 4, 8: 0}),  # unequal spacing: the two widths around the mean
])
def test_width_counts_keep_the_mean(avg, widths, counts):
    got = width_counts(8, avg, widths)
    assert got == counts
    assert sum(b * n for b, n in got.items()) / 8 == pytest.approx(avg)
    with pytest.raises(ConfigError, match="outside"):
        width_counts(8, 9.0, widths)


def test_criteria():
    init = np.ones((3, 4))
    final = np.array([[1, 1, 1, 1], [2, 2, 2, 2], [0.5, 0.5, 0.5, 0.5]])
    assert gate_norm_change(init, final).tolist() == [0.0, 2.0, -1.0]
    w = np.array([[1.0, -1.0, 1.0, -1.0], [3.0, 3.0, 3.0, 3.1]])  # max over neurons, not the largest-norm one
    assert max_intra_neuron_variance(w) == pytest.approx(1.0)
    # MaxVar reordering: expert 3 (last by gate norm) has > zeta x the variance of the first -> moves to the front
    assert combined_order([0, 1, 2, 3], np.array([1.0, 1.0, 1.0, 5.0]), 3.0) == [3, 0, 1, 2]
    assert combined_order([0, 1, 2, 3], np.array([1.0, 1.0, 1.0, 2.0]), 3.0) == [0, 1, 2, 3]
    assert combined_order([0, 1, 2, 3], np.array([1.0, 4.0, 1.0, 1.0]), 3.0) == [1, 0, 2, 3]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from moqe_compile.tasks.causal_lm.model import load_causal_lm
    from moqe_compile.tasks.causal_lm.moe import find_moe

    d = make_tiny_moe(tmp_path_factory.mktemp("moe") / "model", experts=8, layers=2)
    model, _ = load_causal_lm("transformers", str(d))
    return model, find_moe(model), d


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_are_found(layout):
    import torch
    from transformers import AutoModelForCausalLM

    from moqe_compile.tasks.causal_lm.moe import find_moe

    from ...models import tiny_moe_config

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_moe_config(layout))
    moe = find_moe(m)
    assert moe.layout == layout and [b.layer for b in moe.blocks] == [0, 1]
    b = moe.blocks[0]
    assert b.gate_param == "model.layers.0.mlp.gate.weight" and tuple(b.gate_weight().shape) == (4, 64)
    x = b.expert(2)
    assert tuple(x["gate_proj"].shape) == (64, 64) and tuple(x["down_proj"].shape) == (64, 64)
    assert x["up_proj"].data_ptr() == b.experts.gate_up_proj[2, 64:].data_ptr()  # views, not copies
    assert (b.extra_gate_params == ["model.layers.0.mlp.shared_expert_gate.weight"]) == (layout == "qwen2_moe")


def test_dense_model_is_not_moe(tmp_path):
    from moqe_compile.tasks.causal_lm.model import load_causal_lm
    from moqe_compile.tasks.causal_lm.moe import find_moe

    from ...models import make_tiny_lm

    model, _ = load_causal_lm("transformers", str(make_tiny_lm(tmp_path / "m")))
    assert find_moe(model) is None


def test_allocations_and_fallback(tiny_moe, tmp_path):
    from moqe_compile.tasks.causal_lm.moe_bits import history_path, routing_stats

    model, moe, d = tiny_moe
    hist, reason = load_gate_history(history_path("", str(d)), moe)
    assert reason is None and len(hist) == 2
    ids = np.random.default_rng(0).integers(3, 33, (4, 16))
    counts = routing_stats(model, moe, ids).counts
    assert counts.shape == (2, 8) and (counts.sum(1) == ids.size * 2).all()  # top-2 per token
    allocs = {a: allocate(moe, a, 3.0, [2, 3, 4], history=hist, counts=counts, seed=1)
              for a in ("combined", "gate-norm", "maxvar", "uniform", "random", "frequency")}
    for a, al in allocs.items():
        assert al.criterion == a and al.fallback is None
        assert al.mean_bits == pytest.approx(3.0)
        for row in al.bits:
            assert sorted(row) == ([3] * 8 if a == "uniform" else [2, 2, 3, 3, 3, 3, 4, 4])
    lam = np.asarray(allocs["gate-norm"].scores["gate_norm_change"][0])
    g = allocs["gate-norm"].bits[0]
    assert g[int(lam.argmin())] == 4 and g[int(lam.argmax())] == 2  # least change -> most bits
    f = allocs["frequency"].bits[0]
    assert f[int(counts[0].argmax())] == 4
    assert allocs["random"].bits != allocate(moe, "random", 3.0, [2, 3, 4], seed=2).bits
    rec = allocs["combined"].to_manifest()
    from moqe_compile.bundle.manifest import referenced_paths

    assert rec["per_layer"][0]["bits"] == allocs["combined"].bits[0] and referenced_paths(rec) == []
    # No history: the gate-norm criteria fall back to MaxVar and say so.
    said = []
    none, why = load_gate_history(tmp_path / "missing.safetensors", moe)
    fb = allocate(moe, "combined", 3.0, [2, 3, 4], history=none, history_reason=why, say=said.append)
    assert fb.criterion == "maxvar" and "not found" in fb.fallback and "max intra-neuron variance" in said[0]
    assert fb.bits == allocate(moe, "maxvar", 3.0, [2, 3, 4]).bits
    with pytest.raises(ConfigError, match="uniform"):
        allocate(moe, "uniform", 2.5, [2, 3, 4])
    with pytest.raises(BuildError, match="frequency"):
        allocate(moe, "frequency", 3.0, [2, 3, 4])


def test_history_of_another_checkpoint_is_refused(tiny_moe, tmp_path):
    from safetensors.numpy import load_file, save_file

    from moqe_compile.tasks.causal_lm.moe import GATE_HISTORY_FILE

    _, moe, d = tiny_moe
    t = load_file(str(d / GATE_HISTORY_FILE))
    t = {k: (v + 1.0 if k.startswith("final.") else v) for k, v in t.items()}
    save_file(t, str(tmp_path / "h.safetensors"))
    hist, why = load_gate_history(tmp_path / "h.safetensors", moe)
    assert hist is None and "another checkpoint" in why


def test_fake_quant_apply_restore_and_bits_order(tiny_moe):
    import torch

    from moqe_compile.tasks.causal_lm.moe_bits import ExpertFakeQuant, expert_bytes, routing_stats

    model, moe, _ = tiny_moe
    ids = np.random.default_rng(1).integers(3, 33, (4, 16))
    x = torch.from_numpy(ids)
    stats = routing_stats(model, moe, ids, hessians=True)
    assert stats.h_in[0][int(stats.counts[0].argmax())].shape == (64, 64)
    with torch.no_grad():
        ref = model(x).logits
    errs = {}
    for method, sym in (("rtn", True), ("gptq", True), ("gptq", False)):  # GPTQ without / with zero points
        q = ExpertFakeQuant(moe, method, group=32, symmetric=sym, stats=stats)
        for b in (2, 3, 4):
            q.apply([[b] * 8 for _ in moe.blocks])
            with torch.no_grad():
                errs[(method, sym, b)] = float((model(x).logits - ref).pow(2).mean())
        q.apply([[2.5] * 8 for _ in moe.blocks])  # fractional: rows split between 2 and 3 bits
        w = moe.blocks[0].expert(0)["gate_proj"]
        assert torch.equal(w[:32], q.matrix(0, 0, "gate_proj", 3)[:32])
        assert torch.equal(w[32:], q.matrix(0, 0, "gate_proj", 2)[32:])
        q.restore()
        with torch.no_grad():
            assert torch.equal(model(x).logits, ref)
        assert errs[(method, sym, 2)] > errs[(method, sym, 3)] > errs[(method, sym, 4)] > 0
    assert expert_bytes(moe, [[4] * 8] * 2) == pytest.approx(2 * 8 * 3 * 64 * 64 * (0.5 + 2 / 32))
