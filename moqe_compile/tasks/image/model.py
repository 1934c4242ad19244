"""Turn a :class:`ModelConfig` into an FP ONNX model on disk.

torchvision / timm CNNs are built by name, given weights from a state-dict file and
exported with ``torch.onnx.export``; a plain ONNX file is checked and copied. Either way
the result is verified: symbolic batch dimension, one float32 NCHW input, one
[batch, num_classes] output, and (for torch sources) outputs equal to the torch model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx

from moqe_compile.tasks.image.config import ModelConfig, PreprocessConfig
from moqe_compile.errors import BuildError, ConfigError
from moqe_compile.onnx_export import check, export, save_inline
from moqe_compile.recipe import resolve_package_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class FPModel:
    path: Path
    input_name: str
    output_name: str
    num_classes: int
    labels: list[str]


def load_labels(spec: str, num_classes: int) -> list[str]:
    if spec == "imagenet":
        if num_classes != 1000:
            raise ConfigError(f"[model] labels = 'imagenet' needs num_classes = 1000, not {num_classes}.")
        from torchvision.models import MobileNet_V2_Weights

        return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
    if not spec:
        return [f"class_{i}" for i in range(num_classes)]
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"[model] labels = {spec!r}: no such file (one label per line expected).")
    labels = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if len(labels) != num_classes:
        raise ConfigError(f"[model] labels file {spec!r} has {len(labels)} lines; num_classes = {num_classes}.")
    return labels


def _torch_model(cfg: ModelConfig):
    import torch

    if cfg.source == "torchvision":
        import torchvision.models as tvm

        try:
            builder = tvm.get_model_builder(cfg.arch)
        except ValueError as e:
            raise ConfigError(
                f"[model] arch = {cfg.arch!r} is not a torchvision model; e.g. {tvm.list_models()[:8]}."
            ) from e
        model = builder(weights=None, num_classes=cfg.num_classes)
    else:
        import timm

        if not timm.is_model(cfg.arch):
            raise ConfigError(f"[model] arch = {cfg.arch!r} is not a timm model name (see timm.list_models()).")
        if cfg.weights == "pretrained":
            # timm's own pretrained weights: from the local Hugging Face cache or the hub.
            try:
                return timm.create_model(cfg.arch, pretrained=True, num_classes=cfg.num_classes).eval()
            except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
                raise ConfigError(
                    f"[model] weights = 'pretrained': timm could not load pretrained {cfg.arch!r} ({e.__class__.__name__}: "
                    f"{str(e)[:200]}). Without hub access, give a state-dict file instead."
                ) from e
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.num_classes)
    wpath = resolve_package_path(cfg.weights)
    if not wpath.is_file():
        raise ConfigError(f"[model] weights = {cfg.weights!r}: no such file {str(wpath)!r}.")
    if wpath.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(wpath))
    else:
        # weights_only: a state dict is data, never code to unpickle.
        state = torch.load(str(wpath), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"[model] weights {str(wpath)!r} do not match arch {cfg.arch!r}: {str(e)[:400]}") from e
    return model.eval()


def export_torch(model, out: Path, crop: int, opset: int, channels: int = 3) -> None:
    """The torch classifier as one self-contained ONNX file with a symbolic batch, checked
    against torch (``onnx_export``)."""
    import torch

    x = torch.randn(2, channels, crop, crop)
    batch = torch.export.Dim("batch", min=1, max=4096)
    what = f"image model {type(model).__name__}"
    export(model, (x,), out, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
           opset=opset, what=what)
    check(model, out, [(x,)], what=what, atol=1e-3, atol_relative_to_max=True)


def check_fp_onnx(path: Path, crop: int, num_classes: int, channels: int = 3) -> tuple[str, str]:
    """Verify one float NCHW input with a *symbolic* batch dim and a [batch, C] output."""
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{str(path)!r} is not a readable ONNX model: {e}") from e
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(m.graph.output) != 1:
        raise ConfigError(f"{str(path)!r} must have exactly one input and one output (image classifier).")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ConfigError(f"{str(path)!r} input {inputs[0].name!r} has rank {len(dims)}; expected NCHW (rank 4).")
    if not dims[0].dim_param:
        raise BuildError(
            f"{str(path)!r} input {inputs[0].name!r} has a fixed batch dimension ({dims[0].dim_value}); "
            "re-export it with a symbolic batch dimension."
        )
    shape = [d.dim_value for d in dims[1:]]
    if shape != [channels, crop, crop]:
        raise ConfigError(
            f"{str(path)!r} input shape {shape} does not match preprocessing [channels, crop, crop] = "
            f"[{channels}, {crop}, {crop}]."
        )
    odims = m.graph.output[0].type.tensor_type.shape.dim
    if len(odims) == 2 and odims[1].dim_value not in (0, num_classes):
        raise ConfigError(f"{str(path)!r} has {odims[1].dim_value} outputs; [model] num_classes = {num_classes}.")
    return inputs[0].name, m.graph.output[0].name


def load_fp_model(cfg: ModelConfig, pre: PreprocessConfig, out: Path) -> FPModel:
    """Write the FP ONNX model to ``out`` and return its description."""
    labels = load_labels(cfg.labels, cfg.num_classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.source == "onnx":
        src = Path(cfg.path)
        if not src.is_file():
            raise ConfigError(f"[model] path = {cfg.path!r}: no such ONNX file.")
        try:
            save_inline(src, out)  # also pulls in any external-data side file
        except Exception as e:  # noqa: BLE001 - onnx raises several types for bad files
            raise ConfigError(f"[model] path = {cfg.path!r} is not a readable ONNX model: {e}") from e
    else:
        export_torch(_torch_model(cfg), out, pre.crop, cfg.opset, pre.channels)
    in_name, out_name = check_fp_onnx(out, pre.crop, cfg.num_classes, pre.channels)
    return FPModel(out, in_name, out_name, cfg.num_classes, labels)


def write_labels(labels: list[str], path: Path) -> None:
    path.write_text(json.dumps(labels, indent=0))
