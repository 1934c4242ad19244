"""Task plug-ins, found through one registry keyed by a recipe's or a manifest's ``task``.

A plug-in is a package whose ``__init__`` is light (no torch, no onnx at import) and exposes the
same names in every task (see ``tasks/base.py``). Heavy modules are imported inside its functions,
so a runtime-only install can dispatch on a bundle without the build stack.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from moqe_compile.errors import ConfigError
from moqe_compile.recipe import read_recipe_toml

DEFAULT_TASK = "image-classification"

TASKS: dict[str, str] = {
    "image-classification": "moqe_compile.tasks.image",
    "causal-lm": "moqe_compile.tasks.causal_lm",
}


def register(kind: str, module: str) -> None:
    """Make ``task = kind`` resolve to the plug-in package ``module`` (import path)."""
    TASKS[kind] = module


def kind_of(doc: dict) -> str:
    """The task kind of a recipe table (``task = "..."``) or a manifest (``task.kind``)."""
    kind = doc.get("task", DEFAULT_TASK) if isinstance(doc, dict) else DEFAULT_TASK
    kind = kind.get("kind", DEFAULT_TASK) if isinstance(kind, dict) else kind
    if not isinstance(kind, str) or kind not in TASKS:
        raise ConfigError(f"task = {kind!r} is not one of {sorted(TASKS)}.")
    return kind


def task_of(doc: dict) -> ModuleType:
    """The plug-in package for a recipe table or a manifest."""
    return importlib.import_module(TASKS[kind_of(doc)])


def load_recipe(path: str | Path) -> Any:
    """Read and validate a TOML recipe of any registered task (its ``task`` key picks the plug-in)."""
    doc, _ = read_recipe_toml(path)
    return task_of(doc).load_recipe(path)
