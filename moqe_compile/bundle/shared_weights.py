"""One copy of a tensor that several graphs of a bundle hold bit-identically.

A causal-LM bundle's FP decoder, every expert and the router all carry the FP token-embedding
table (it stays FP in every expert, and the router reads it): 113 MB per graph for SmolLM2-135M,
more than half of each 4-bit expert. The build stores the table once (``shared/<name>.bin``,
raw little-endian) and marks those initializers in each graph as external data at a location
that is never read (``<name>.bin`` beside the graph does not exist); sessions get the table
through ONNX Runtime's ``SessionOptions.add_external_initializers``, one OrtValue over one
numpy buffer for all of them, so the runtime also holds it once in memory.

Why not plain ONNX external data pointing at one file: ONNX Runtime refuses external data
paths that leave the graph's directory ("escapes model directory"), and the bundle keeps one
directory per expert. ``onnx.load(path, load_external_data=False)`` still reads these graphs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from moqe_compile.errors import BundleError

DTYPES = {"float32": np.float32, "float16": np.float16}


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def externalize(graph: Path, table: np.ndarray, location: str, digest: str | None = None) -> list[str]:
    """Mark every initializer of ``graph`` that equals ``table`` (shape, dtype, bytes) as external
    data at ``location``; rewrites the file. Returns the initializer names (possibly none).
    ``digest``: ``table``'s sha256 when the caller already has it (one hash for many graphs)."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(graph))
    want, names = digest or _digest(table), []
    for t in model.graph.initializer:
        if tuple(t.dims) != table.shape or t.data_type != onnx.helper.np_dtype_to_tensor_dtype(table.dtype):
            continue
        if _digest(numpy_helper.to_array(t)) != want:
            continue
        set_external_data(t, location=location, offset=0, length=table.nbytes)
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        names.append(t.name)
    if names:
        tmp = graph.with_name(graph.name + ".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(graph)
    return names


def share(graphs: dict[str, Path], table: np.ndarray, name: str, out_dir: Path) -> dict:
    """Store ``table`` once as ``out_dir/shared/<name>.bin`` and externalize it in ``graphs``
    (bundle-relative path -> file). Returns the manifest record."""
    table = np.ascontiguousarray(table)
    dtype = next((k for k, v in DTYPES.items() if table.dtype == v), None)
    if dtype is None:
        raise BundleError(f"shared tensor {name!r} has dtype {table.dtype}; supported: {list(DTYPES)}.")
    rel = f"shared/{name}.bin"
    dest = out_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    table.astype(table.dtype.newbyteorder("<"), copy=False).tofile(dest)
    location = f"{name}.bin"
    digest = _digest(table)
    per_graph = {g: externalize(p, table, location, digest) for g, p in graphs.items()}
    return {"path": rel, "dtype": dtype, "shape": list(table.shape), "location": location,
            "graphs": {g: n for g, n in per_graph.items() if n}}


class SharedTensors:
    """The bundle's shared tensors, each read once, verified (``Bundle.read``: the bytes that
    were hashed are the bytes served) and handed to every session whose graph uses it."""

    def __init__(self, bundle):
        self._records = bundle.manifest.get("model", {}).get("shared_initializers") or {}
        self._bundle = bundle
        self._arrays: dict[str, np.ndarray] = {}
        self._values: dict[str, object] = {}

    def names_for(self, graph_rel: str) -> set[str]:
        """The initializers of the graph at ``graph_rel`` that a shared tensor supplies."""
        return {init for r in self._records.values() for init in r["graphs"].get(graph_rel, [])}

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            r = self._records[name]
            data = self._bundle.read(r["path"])
            dtype = np.dtype(DTYPES[r["dtype"]]).newbyteorder("<")
            try:
                self._arrays[name] = np.frombuffer(data, dtype=dtype).reshape(tuple(r["shape"]))
            except ValueError as e:
                raise BundleError(f"shared tensor {name!r}: {r['path']!r} holds {len(data)} bytes, not a "
                                  f"{r['dtype']} tensor of shape {r['shape']}.") from e
        return self._arrays[name]

    def _value(self, name: str):
        if name not in self._values:
            import onnxruntime as ort

            # ONNX Runtime wraps the buffer without copying it; the bytes object stays referenced
            # by the array, the array by ``_arrays``, the OrtValue by ``_values``.
            self._values[name] = ort.OrtValue.ortvalue_from_numpy(self._array(name))
        return self._values[name]

    def arrays_for(self, graph_rel: str) -> dict[str, np.ndarray]:
        """Initializer name -> the shared tensor that supplies it, for the graph at ``graph_rel``."""
        return {init: self._array(name) for name, r in self._records.items() for init in r["graphs"].get(graph_rel, [])}

    def add_to(self, so, graph_rel: str) -> None:
        """Give ``so`` (SessionOptions) every shared tensor the graph at ``graph_rel`` uses."""
        names, values = [], []
        for name, r in self._records.items():
            for init in r["graphs"].get(graph_rel, []):
                names.append(init)
                values.append(self._value(name))
        if names:
            so.add_external_initializers(names, values)


__all__ = ["SharedTensors", "externalize", "share"]
