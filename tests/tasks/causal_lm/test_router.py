"""NLP router: learns a constructed token-set task, exports with symbolic batch/sequence."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moqe_compile.tasks.causal_lm.router import (ATTENTION_MASK, INPUT_IDS, NLPRouter, export_nlp_router,
                                     predict_probs, train_router)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny routers: one torch thread

V, D, K, T = 64, 32, 3, 12
SETS = [np.arange(1, 21), np.arange(21, 41), np.arange(41, 61)]  # token 0 is padding


def _data(n, seed):
    """Sequence i draws its tokens from SETS[k_i] only; expert k_i is the best for it."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, K, n)
    ids, mask = np.zeros((n, T), np.int64), np.zeros((n, T), np.int64)
    for i in range(n):
        length = rng.integers(3, T + 1)
        ids[i, :length] = rng.choice(SETS[k[i]], length)
        mask[i, :length] = 1
    loss = 1.0 + rng.normal(0, 0.01, (n, K))
    loss[np.arange(n), k] = 0.5
    return ids, mask, loss, k


@pytest.fixture(scope="module")
def trained():
    emb = torch.randn(V, D, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    router = NLPRouter(emb, K)
    ti, tm, tl, _ = _data(240, 0)
    vi, vm, vl, _ = _data(120, 1)
    res = train_router(router, ti, tm, tl, vi, vm, vl, epochs=4, batch_size=16, lr=2e-3)
    return emb, res


def test_architecture_follows_the_design():
    r = NLPRouter(torch.randn(V, D), K)
    assert len(r.encoder) == 2 and r.encoder[0].attn.heads == 4
    assert r.encoder[0].ff[0].out_features == 2 * D and isinstance(r.encoder[0].ff[1], torch.nn.GELU)
    assert r.encoder[0].drop.p == 0.1 and r.refine.log_tau is not None  # refinement: learned temperature
    assert [m.out_features for m in r.head if isinstance(m, torch.nn.Linear)] == [D // 2, K]
    # The embedding is frozen: not a parameter, so no optimizer can touch it.
    assert all(p.data_ptr() != r.embedding.data_ptr() for p in r.parameters())


def test_learns_which_token_set_a_sequence_draws_from(trained):
    emb, res = trained
    ids, mask, _, k = _data(300, 2)
    acc = (predict_probs(res.model, ids, mask).argmax(1) == k).mean()
    assert acc >= 0.9, acc
    torch.testing.assert_close(res.model.embedding, emb)  # unchanged by training


def test_padding_does_not_change_the_route(trained):
    _, res = trained
    ids, mask, _, _ = _data(8, 3)
    wide_ids = np.concatenate([ids, np.full((8, 5), 7, np.int64)], 1)  # junk tokens under mask 0
    wide_mask = np.concatenate([mask, np.zeros((8, 5), np.int64)], 1)
    np.testing.assert_allclose(predict_probs(res.model, ids, mask), predict_probs(res.model, wide_ids, wide_mask),
                               atol=1e-5)


def test_onnx_round_trip_with_symbolic_batch_and_sequence(trained, tmp_path):
    _, res = trained
    p = tmp_path / "nlp_router.onnx"
    export_nlp_router(res.model, p)
    g = onnx.load(str(p))
    assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.graph.input}
    assert all(all(dims[n]) for n in (INPUT_IDS, ATTENTION_MASK)), dims
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    for n, t in ((1, 3), (6, 20)):  # shapes the exporter never saw
        ids, mask, _, _ = _data(n, 10 + n)
        ids, mask = np.resize(ids, (n, t)), np.resize(mask, (n, t))
        got = sess.run(None, {INPUT_IDS: ids, ATTENTION_MASK: mask})[0]
        np.testing.assert_allclose(got, predict_probs(res.model, ids, mask), atol=1e-4)


def test_symbolic_dims_check_rejects_a_fixed_sequence(tmp_path):
    from onnx import TensorProto, helper

    from moqe_compile.errors import BuildError
    from moqe_compile.onnx_export import check_symbolic

    x = helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", 12])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", 12])
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", [INPUT_IDS], ["y"])], "g", [x], [y]))
    onnx.save(m, str(tmp_path / "m.onnx"))
    with pytest.raises(BuildError, match=r"'input_ids' lost its symbolic dimension\(s\) \[1\]"):
        check_symbolic(tmp_path / "m.onnx", {INPUT_IDS: [0, 1]}, "NLP router")


def test_choose_prefix_takes_the_shortest_length_not_significantly_worse():
    from moqe_compile.tasks.causal_lm.router import choose_prefix

    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, 200)
    # 16 is clearly worse; 32 and 64 differ by noise only; 128 is the lowest by a hair.
    loss = {16: base + 0.3, 32: base + rng.normal(0, 0.01, 200), 64: base + rng.normal(0, 0.01, 200), 128: base - 0.001}
    chosen, rec = choose_prefix(loss)
    assert rec["lowest"] == 128 and chosen == 32
    assert not rec["lengths"]["16"]["not_worse"] and rec["lengths"]["32"]["not_worse"]
    assert rec["lengths"]["128"]["vs_lowest"]["diff"] == 0.0
    chosen, _ = choose_prefix({16: base + 0.3, 32: base})  # a clear winner is kept even when longer
    assert chosen == 32


def test_build_chooses_the_prefix_on_router_val_and_records_it(tmp_path):
    pytest.importorskip("transformers")
    import json

    from moqe_compile.build import build
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    from ...models import make_tiny_lm, tiny_lm_config, write_corpus

    make_tiny_lm(tmp_path / "model")
    write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_lm_config(tmp_path, prefix_choices=[4, 16], epochs=1)
    cfg.experts, cfg.controls.copies = cfg.experts[:1] + cfg.experts[2:], 0  # w8a8-rtn, w4-gptq: quick
    out = build(cfg, tmp_path / "bundle", quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    rep = json.loads((out / "report/report.json").read_text())["router_training"]["prefix_choice"]
    assert set(rep["lengths"]) == {"4", "16"} and m["router"]["prefix_tokens"] == rep["chosen"] in (4, 16)
    assert m["router"]["config"]["prefix_choices"] == [4, 16]
    with LMRuntime.load(out) as rt:  # the runtime routes on the chosen length
        assert rt.prefix_tokens == rep["chosen"]
