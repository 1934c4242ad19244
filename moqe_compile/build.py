"""``moqe-compile build``: the one build, with the task's steps in the middle.

A build opens a :class:`~moqe_compile.bundle.BundleWriter` (nothing reaches the output path
unless every stage succeeds) and a scratch folder, then runs the task plug-in's steps in the
plug-in's order. What is the same for every task lives here or in :mod:`moqe_compile.stages`:
stage timing, peak memory and logging, the copies control (:func:`moqe_compile.stages.build_copies`), the
significance gate (``gate.py``), the provenance fields of the manifest and the commit.
Rationale: ``docs/design.md#one-core-two-task-plug-ins``.
"""

from __future__ import annotations

from pathlib import Path

from moqe_compile.bundle import BundleWriter
from moqe_compile.stages import Stages, created_at, versions
from moqe_compile.tasks import DEFAULT_TASK, task_of


def build(cfg, out: str | Path, quiet: bool = False, force: bool = False) -> Path:
    """Compile the recipe ``cfg`` (a task plug-in's config) into a bundle at ``out``.
    ``force``: replace ``out`` even when it is a directory that is not a moqe bundle."""
    plugin = task_of({"task": getattr(cfg, "task", DEFAULT_TASK)})
    stages = Stages(quiet)
    # The scratch folder sits beside the output (BundleWriter.work_dir), so a killed build's
    # leftovers are found and removed by the next build to that path.
    with BundleWriter(out, force=force) as w:
        steps = plugin.build_steps(cfg, w, w.work_dir(), stages)
        for name in steps.ORDER:
            with stages.stage(name):
                getattr(steps, name)()
        gate = steps.gate
        stages.say(f"gate: {gate['decision']} ({gate['reason']})")
        manifest = {"created_with": versions(**steps.extra_versions()), "created_at": created_at(),
                    "build_config": cfg.to_manifest(), **steps.manifest()}
        manifest["report"]["build_seconds"] = stages.finish()
        stages.add_to_report(w.path(manifest["report"]["path"]))
        return w.commit(manifest)
