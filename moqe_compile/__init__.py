"""moqe-compile: a deployment compiler for Mixture of Quantization Experts (MoQE).

``moqe_compile.load(path)`` is all a service needs: it returns the bundle's runtime, whatever
its task. The build stages import torch lazily, so the runtime stays light.
"""

from __future__ import annotations

import os
from pathlib import Path

from moqe_compile.version import __version__


def task_of_bundle(path: str | Path):
    """The task plug-in of the bundle at ``path``, from its manifest.json alone (no hashing).

    A directory without a readable manifest is left to the task's own reader, which names
    what is wrong with it; a task this release does not know is a ``BundleError``.
    """
    from moqe_compile.bundle.reader import parse_manifest
    from moqe_compile.errors import BundleError, ConfigError
    from moqe_compile.tasks import task_of

    try:
        doc = parse_manifest(Path(path) / "manifest.json")  # within the reader's size and depth limits
    except BundleError:
        doc = {}
    task = doc.get("task") if isinstance(doc, dict) else None
    if not (isinstance(task, dict) and isinstance(task.get("kind", ""), str)):
        doc = {}  # not a manifest: the reader names what is wrong
    try:
        return task_of(doc)
    except ConfigError as e:
        raise BundleError(f"bundle {str(path)!r}: {e} Upgrade moqe-compile or rebuild the bundle.") from e


def load(path: str | Path, **options):
    """Open the bundle at ``path`` and return its task's runtime (``run``/``submit``/``close``):
    ``Runtime`` for image classification, ``LMRuntime`` for causal LMs. ``options`` go to that
    runtime's ``load`` (e.g. ``verify=False``, ``backend=...``, ``queue=QueueConfig(...)``)."""
    if not isinstance(path, (str, os.PathLike)):
        from moqe_compile.errors import BundleError

        raise BundleError(f"load() takes a bundle directory (a str or a path), not {type(path).__name__}.")
    return task_of_bundle(path).load_runtime(path, **options)


def __getattr__(name: str):
    if name in ("Runtime", "RunResult"):
        import importlib

        return getattr(importlib.import_module("moqe_compile.tasks.image.runtime"), name)
    raise AttributeError(f"module 'moqe_compile' has no attribute {name!r}")


__all__ = ["load", "task_of_bundle", "Runtime", "RunResult", "__version__"]
