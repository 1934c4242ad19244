"""Causal language models: transformers directories or GGUF files, per-sequence routing."""

from __future__ import annotations

KIND = "causal-lm"
SERVING_CODEC = False  # the v2 server's codec is for image tensors; text serving is not built


def load_recipe(path):
    from moqe_compile.tasks.causal_lm.config import load_lm_recipe

    return load_lm_recipe(path)


def default_config():
    from moqe_compile.tasks.causal_lm.config import LMBuildConfig

    return LMBuildConfig()


def build_steps(cfg, writer, work, stages):
    """The task's steps for ``moqe_compile.build.build`` (export, data, quantize, ..., manifest)."""
    from moqe_compile.tasks.causal_lm.steps import LMSteps

    return LMSteps(cfg, writer, work, stages)


def load_runtime(bundle_dir, **options):
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    return LMRuntime.load(bundle_dir, **options)


def render(bundle) -> str:
    from moqe_compile.tasks.causal_lm import inspect

    return inspect.render(bundle)


def evaluate(args) -> int:
    from moqe_compile.tasks.causal_lm.eval import cmd_eval

    return cmd_eval(args)
