"""Router -> ONNX (opset >= 17, symbolic batch) and safetensors weights for retraining."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import BuildError
from ..models.loader import save_inline
from .cv import CVRouter, CVRouterCore

INPUT_NAME = "input"
OUTPUT_NAME = "expert_probs"


def export_router(core: CVRouterCore, input_size: int, crop: int, onnx_path: Path, weights_path: Path,
                  opset: int = 18) -> None:
    from safetensors.torch import save_file

    model = CVRouter(core, input_size).eval()
    x = torch.randn(2, 3, crop, crop)
    with tempfile.TemporaryDirectory(prefix="moqe-router-") as tmp:
        raw = Path(tmp) / "router.onnx"
        try:
            torch.onnx.export(
                model, (x,), str(raw), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            raise BuildError(f"router ONNX export failed: {e}") from e
        save_inline(raw, onnx_path)
    g = onnx.load(str(onnx_path))
    if not g.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        raise BuildError("router ONNX lost its symbolic batch dimension on export.")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {INPUT_NAME: x.numpy()})[0]
    if not np.allclose(ref, got, atol=1e-4):
        raise BuildError(f"router ONNX differs from torch: max |diff| {np.abs(ref - got).max():.3g}.")
    save_file({k: v.contiguous() for k, v in core.state_dict().items()}, str(weights_path))
