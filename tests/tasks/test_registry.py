"""The task registry: a recipe's ``task`` picks the plug-in."""

from __future__ import annotations

import pytest

from moqe_compile.errors import ConfigError
from moqe_compile.tasks import load_recipe


def test_registry_load_recipe_dispatches_on_task(tmp_path):
    from moqe_compile.tasks.image.config import BuildConfig

    p = tmp_path / "r.toml"
    p.write_text("[router]\nepochs = 3\n")
    cfg = load_recipe(p)
    assert isinstance(cfg, BuildConfig) and cfg.router.epochs == 3
    p.write_text('task = "speech"\n')
    with pytest.raises(ConfigError, match="task = 'speech' is not one of"):
        load_recipe(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
