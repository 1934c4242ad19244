"""What every task plug-in package exposes (checked by the tests for each registered task).

- ``KIND``: the task kind string (``task`` in recipes, ``task.kind`` in manifests).
- ``load_recipe(path) -> config``: read and validate a TOML recipe of this task.
- ``default_config() -> config``: the task's defaults.
- ``build_steps(config, writer, work, stages)``: the object whose ``ORDER`` names the step methods
  ``moqe_compile.build.build`` runs, then ``gate``, ``extra_versions()`` and ``manifest()``.
- ``load_runtime(bundle_dir, **options)``: the bundle's runtime (``run``/``submit``/``close``).
- ``render(bundle) -> str``: the human summary of a read bundle (``moqe-compile inspect``).
- ``evaluate(args) -> int``: ``moqe-compile eval`` for a bundle of this task.
- ``SERVING_CODEC``: ``True`` when ``moqe-serve`` can serve the task over the v2 protocol.

The hooks are not named after the plug-in's modules (``runtime.py``, ``inspect.py``): importing
a submodule sets the package attribute of that name, which would replace a hook so named.
"""

from __future__ import annotations

PLUGIN_NAMES = ("KIND", "load_recipe", "default_config", "build_steps", "load_runtime", "render", "evaluate",
                "SERVING_CODEC")
