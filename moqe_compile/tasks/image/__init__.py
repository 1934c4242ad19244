"""Image classification: torchvision/timm CNNs or ONNX files, per-input routing."""

from __future__ import annotations

KIND = "image-classification"
SERVING_CODEC = True


def load_recipe(path):
    from moqe_compile.tasks.image.config import load_recipe as load

    return load(path)


def default_config():
    from moqe_compile.tasks.image.config import BuildConfig

    return BuildConfig()


def build_steps(cfg, writer, work, stages):
    """The task's steps for ``moqe_compile.build.build`` (export, data, quantize, ..., manifest)."""
    from moqe_compile.tasks.image.steps import ImageSteps

    return ImageSteps(cfg, writer, work, stages)


def load_runtime(bundle_dir, **options):
    """``Runtime.load(bundle_dir, **options)``; a GPU backend (``backend="onnxruntime-cuda"``)
    gets ``GpuRuntime.load``. ``input_limits`` (an ``InputLimits``) sets the runtime's
    ``input_limits``."""
    limits = options.pop("input_limits", None)
    rt = _load(bundle_dir, **options)
    if limits is not None:
        rt.input_limits = limits
    return rt


def _load(bundle_dir, **options):
    from moqe_compile.backends import BACKENDS, GPU_BACKENDS

    backend = options.get("backend", "auto")
    if backend in GPU_BACKENDS and backend not in BACKENDS:
        from moqe_compile.tasks.image.runtime_gpu import GpuRuntime

        return GpuRuntime.load(bundle_dir, **options)
    from moqe_compile.tasks.image.runtime import Runtime

    return Runtime.load(bundle_dir, **options)


def render(bundle) -> str:
    from moqe_compile.tasks.image import inspect

    return inspect.render(bundle)


def evaluate(args) -> int:
    from moqe_compile.tasks.image.eval import cmd_eval

    return cmd_eval(args)
