"""``moqe-compile build``: the one build, with the task's steps in the middle.

A build opens a :class:`~moqe_compile.bundle.BundleWriter` (nothing reaches the output path
unless every stage succeeds) and a scratch folder, then runs the task plug-in's steps in the
plug-in's order. What is the same for every task lives here: stage timing and logging, the copies
control's calibration split (:func:`build_copies`), the significance gate (``gate.py``), the
provenance fields of the manifest and the commit. Rationale: ``docs/design.md#one-core-two-task-plug-ins``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from moqe_compile.bundle import BundleWriter
from moqe_compile.stages import Stages, created_at, log, versions
from moqe_compile.tasks import DEFAULT_TASK, task_of


def build(cfg, out: str | Path, quiet: bool = False) -> Path:
    """Compile the recipe ``cfg`` (a task plug-in's config) into a bundle at ``out``."""
    plugin = task_of({"task": getattr(cfg, "task", DEFAULT_TASK)})
    stages = Stages(quiet)
    with BundleWriter(out) as w, tempfile.TemporaryDirectory(prefix="moqe-work-") as work:
        steps = plugin.build_steps(cfg, w, Path(work), stages)
        for name in steps.ORDER:
            with stages.stage(name):
                getattr(steps, name)()
        gate = steps.gate
        log.info(f"gate: {gate['decision']} ({gate['reason']})")
        manifest = {"created_with": versions(**steps.extra_versions()), "created_at": created_at(),
                    "build_config": cfg.to_manifest(), **steps.manifest()}
        manifest["report"]["build_seconds"] = stages.finish()
        return w.commit(manifest)


def copy_parts(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint random subsets of ``range(n)`` (each sorted), seeded: the copies' calibration data."""
    return [np.sort(p) for p in np.array_split(np.random.default_rng(seed).permutation(n), k)]


def build_copies(recipe, n_calibration: int, k: int, seed: int, build_one: Callable[[object, np.ndarray], object],
                 stages: Stages, label: str) -> list:
    """The copies control: ``k`` copies of ``recipe`` (named ``copy0..``), each built by
    ``build_one(recipe_copy, calibration_indices)`` on a disjoint random part of the calibration
    data. They differ only by calibration noise (``docs/design.md#controls-and-the-gate``)."""
    from moqe_compile.errors import BuildError

    if n_calibration < k:
        raise BuildError(f"[controls] copies = {k} needs at least {k} calibration samples of {label!r}; "
                         f"there are {n_calibration}: raise the calibration data or lower copies.")
    built = []
    with stages.bar(k, f"copies of {label}") as pb:
        for i, idx in enumerate(copy_parts(n_calibration, k, seed)):
            stages.say(f"controls: copy {i + 1}/{k} of {label} on {len(idx)} calibration samples")
            built.append(build_one(replace(recipe, name=f"copy{i}"), idx))
            pb.update(1)
    return built
