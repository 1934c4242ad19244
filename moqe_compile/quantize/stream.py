"""Intermediate tensors of one ONNX graph on a fixed set of inputs, each node run once.

The sequential pass (``sequential.py``) needs, layer after layer, a tensor of the graph *as it
is now* (every layer before it already refitted). Running the whole graph for each such tensor
costs O(L^2) layer evaluations and a new ONNX Runtime session per tensor. :class:`TensorStream`
instead keeps the tensors that later nodes still read (the frontier) and runs only the segment
of nodes between the frontier and the tensor asked for, once, in one small session. When the
caller changes initializers (:meth:`TensorStream.changed`), the nodes that read them and what
was computed from them are run again on the next request, so a value handed out is always the
value the whole graph would compute now (up to the float rounding of a different fusion).

ONNX Runtime cannot start a run from an intermediate tensor, and ``onnx.utils.Extractor``
re-infers shapes of the whole model on construction and copies its initializers (which the
pass keeps changing), hence the segments are cut here (a node list and its boundary tensors).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from moqe_compile.backends.onnxruntime_cpu import session


def varying_tensors(model: onnx.ModelProto, input_name: str) -> set[str]:
    """Tensors of ``model`` with one value per input sample (the rest, e.g. dequantized weights,
    are constants): ``input_name`` and everything computed from it."""
    out = {input_name}
    for n in model.graph.node:
        if any(t in out for t in n.input):
            out.update(o for o in n.output if o)
    return out


class TensorStream:
    """Tensors of ``model`` (a topologically sorted graph, edited in place by the caller) on
    inputs ``x`` fed to ``input_name``, computed on demand in batches of ``batch`` samples.
    ``optimization``: ONNX Runtime's graph optimization level for each segment (``"none"``
    evaluates Q/DQ nodes as written, the default fuses them where a segment holds a whole
    pattern, as the whole graph's session did)."""

    def __init__(self, model: onnx.ModelProto, input_name: str, x: np.ndarray, batch: int = 16,
                 optimization: str = "all"):
        self.model, self.batch, self.optimization = model, batch, optimization
        self.nodes = list(model.graph.node)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: k for k, n in enumerate(self.nodes) for o in n.output if o}
        self.consumers: dict[str, list[int]] = {}
        for k, n in enumerate(self.nodes):
            for t in n.input:
                self.consumers.setdefault(t, []).append(k)
        self.varying = varying_tensors(model, input_name)
        self.env: dict[str, np.ndarray] = {input_name: x}
        self.input_name = input_name  # never dropped: everything can be recomputed from it
        self.done: set[int] = set()
        # The caller's place in the node list: tensors read at or after it stay, because the
        # caller may still edit that node (a caller that edits nothing leaves it at the end).
        self.pos = len(self.nodes)
        self.segments = 0  # sessions run
        self.node_runs = 0  # node evaluations: the graph's node count when nothing was edited

    def get(self, name: str) -> np.ndarray:
        """The value of tensor ``name`` over every input sample."""
        if name not in self.env:
            self._run_segment(name)
        value = self.env[name]
        self._forget()
        return value

    def changed(self, init_names) -> None:
        """Initializers ``init_names`` were edited: what was computed from them is stale."""
        stale = [k for t in init_names for k in self.consumers.get(t, []) if k in self.done]
        while stale:
            k = stale.pop()
            if k not in self.done:
                continue
            self.done.discard(k)
            for o in self.nodes[k].output:
                self.env.pop(o, None)
                stale += [c for c in self.consumers.get(o, []) if c in self.done]

    def _segment(self, name: str) -> list[int]:
        """The nodes that compute ``name`` from the frontier, in graph order."""
        need, stack = set(), [name]
        while stack:
            t = stack.pop()
            if not t or t in self.env or t in self.inits:
                continue
            k = self.producer[t]
            if k not in need:
                need.add(k)
                stack += list(self.nodes[k].input)
        return sorted(need)

    def _run_segment(self, name: str) -> None:
        seg = self._segment(name)
        in_seg = set(seg)
        produced = {o for k in seg for o in self.nodes[k].output if o}
        feeds = sorted({t for k in seg for t in self.nodes[k].input if t in self.env and t not in produced})
        used_inits = sorted({t for k in seg for t in self.nodes[k].input if t in self.inits})
        # Keep every output a node outside this segment (not yet run) will read, and the one asked for.
        keep = [o for k in seg for o in self.nodes[k].output
                if o and (o == name or any(c not in in_seg and c not in self.done for c in self.consumers.get(o, [])))]
        g = helper.make_graph(
            [self.nodes[k] for k in seg], "segment",
            [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(self.env[t].dtype), None)
             for t in feeds],
            [helper.make_empty_tensor_value_info(t) for t in keep],
            initializer=[self.inits[t] for t in used_inits])
        m = helper.make_model(g, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        sess = session(m.SerializeToString(), optimization=self.optimization, name="sequential pass segment")
        n = next((len(self.env[t]) for t in feeds if t in self.varying), 1)
        parts: list[list[np.ndarray]] = [[] for _ in keep]
        for i in range(0, n, self.batch):
            feed = {t: self.env[t][i : i + self.batch] if t in self.varying else self.env[t] for t in feeds}
            for p, r in zip(parts, sess.run(keep, feed)):
                p.append(r)
        for t, p in zip(keep, parts):
            self.env[t] = np.concatenate(p) if t in self.varying and len(p) > 1 else p[0]
        self.done |= in_seg
        self.segments += 1
        self.node_runs += len(seg)

    def _forget(self) -> None:
        """Drop tensors no node at or after ``pos`` reads and every reader of which has run."""
        for t in list(self.env):
            if t == self.input_name:
                continue
            readers = self.consumers.get(t, [])
            if all(c in self.done and c < self.pos for c in readers):
                del self.env[t]
