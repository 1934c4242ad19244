"""torch -> ONNX, and the one check every exported graph passes.

Every graph the build exports from torch (the image model, the decoder, both routers) goes
through :func:`export` (torch's dynamo exporter, then one self-contained file: a bundle file
must not depend on a sibling ``.data`` file) and :func:`check` (the graph on ONNX Runtime
against the torch module on fixed examples; a :class:`~moqe_compile.errors.BuildError` names
the output and its largest difference). :func:`check_symbolic` verifies the dimensions that
must stay symbolic (batch, sequence), which the exporter can silently specialise.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from moqe_compile.errors import BuildError


def save_inline(src: str | Path, dst: str | Path) -> None:
    """Re-save an ONNX model (< 2 GB) as one self-contained file (external data pulled in)."""
    onnx.save(onnx.load(str(src)), str(dst), save_as_external_data=False)


def export(module, example: tuple, dest: str | Path, *, input_names: Sequence[str], output_names: Sequence[str],
           dynamic_shapes: tuple, opset: int, what: str,
           rewrite: Callable[[onnx.ModelProto], None] | None = None) -> Path:
    """Export ``module`` called on ``example`` to one self-contained ONNX file at ``dest``.

    ``rewrite(model)``: in-place graph edits applied before saving (e.g. folding weight
    transposes). The dynamo exporter may settle on a newer opset than asked when its version
    converter cannot downgrade an op."""
    import torch

    with tempfile.TemporaryDirectory(prefix="moqe-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(module, example, str(raw), input_names=list(input_names),
                              output_names=list(output_names), opset_version=opset, dynamo=True,
                              dynamic_shapes=dynamic_shapes, verbose=False)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; report them as one
            raise BuildError(f"{what}: ONNX export failed: {e}") from e
        model = onnx.load(str(raw))
        if rewrite is not None:
            rewrite(model)
        onnx.save(model, str(dest), save_as_external_data=False)
    return Path(dest)


def _as_numpy(t) -> np.ndarray:
    return t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)


def check(module, path: str | Path, examples: Sequence[tuple], *, what: str, atol: float = 1e-4, rtol: float = 0.0,
          atol_relative_to_max: bool = False) -> None:
    """Run the ONNX graph at ``path`` and ``module`` on each example (a tuple of tensors, fed
    to the graph's inputs in order) and compare every output. ``atol_relative_to_max``: the
    tolerance scales with the largest reference magnitude (logits of any size)."""
    import torch

    from moqe_compile.backends.onnxruntime_cpu import session

    sess = session(path, name=what)
    names = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    for ex in examples:
        with torch.no_grad():
            ref = module(*ex)
        ref = [_as_numpy(r) for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
        got = sess.run(None, dict(zip(names, (_as_numpy(t) for t in ex))))
        shapes = [tuple(t.shape) for t in ex]
        for name, r, g in zip(outputs, ref, got):
            tol = atol * max(1.0, float(np.abs(r).max())) if atol_relative_to_max else atol
            if r.shape != g.shape:
                raise BuildError(f"{what}: ONNX output {name!r} has shape {g.shape}, torch {r.shape} "
                                 f"(inputs {shapes}).")
            if not np.allclose(r, g, atol=tol, rtol=rtol):
                raise BuildError(f"{what}: ONNX output {name!r} differs from torch on inputs {shapes}: "
                                 f"max |diff| {np.abs(r - g).max():.3g} (atol {tol:.3g}, rtol {rtol:g}).")


def check_symbolic(path: str | Path, dims: dict[str, Sequence[int]], what: str) -> None:
    """Each named graph input/output keeps a symbolic dimension at each listed axis."""
    g = onnx.load(str(path), load_external_data=False).graph
    values = {v.name: v for v in [*g.input, *g.output]}
    for name, axes in dims.items():
        if name not in values:
            raise BuildError(f"{what}: ONNX graph has no input or output {name!r}.")
        shape = values[name].type.tensor_type.shape.dim
        lost = [a for a in axes if a >= len(shape) or not shape[a].dim_param]
        if lost:
            raise BuildError(f"{what}: ONNX {name!r} lost its symbolic dimension(s) {lost} on export: "
                             f"{[d.dim_param or d.dim_value for d in shape]}.")
