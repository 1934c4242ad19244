"""Sibling MatMulNBits nodes as one: a decoder's q/k/v projections read the same activation, and
so do an MLP's gate and up projections. ONNX Runtime runs each as a kernel of its own, and at
one token per step (decoding) a 4-bit kernel's fixed cost (dispatch, waking the thread pool)
is a large part of its time. One node over the concatenated columns, then a ``Split``, runs
the same arithmetic in fewer, larger kernels (docs/results.md#fused-sibling-matmuls-and-norms).

Exact: MatMulNBits quantizes each output column on its own, in blocks along K, so the codes,
scales and zero points of the fused node are the siblings' concatenated along N, and every
output column is computed from the same numbers as before (the equivalence is tested bit for
bit). Nodes are fused only where every attribute that changes the arithmetic agrees: K, bits,
block size, ``accuracy_level``, the grid (``doc_string``), and which optional inputs are given.

Our own code: neither ONNX Runtime's graph optimizer nor its ``transformers`` fusions merge
MatMulNBits nodes that share an input (ONNX Runtime 1.32; its attention fusion packs the q/k/v
weights of float graphs it recognizes, not these). ``float_matmuls=True`` merges float MatMuls
with constant 2-D weights the same way (weights concatenated along N); the build does not do
that to the FP graph, which stays the quantizers' input as exported, but the benchmarks use it
as the control: how much of a fused expert's gain the same rewrite gives FP.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

# MatMulNBits inputs: A, B, scales, zero_points, g_idx, bias. g_idx maps K to groups per node,
# so nodes carrying one are left alone; every other optional input concatenates along N.
_G_IDX = 4


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _key(node, inits: dict, float_matmuls: bool) -> tuple | None:
    """What siblings must share to be fused, or None where this node cannot be."""
    if float_matmuls and node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
        return ("MatMul", node.input[0], inits[node.input[1]].data_type)
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return None
    given = tuple(bool(i) for i in node.input[1:])
    if len(node.input) > _G_IDX and node.input[_G_IDX]:
        return None
    if not all(i in inits for i in node.input[1:] if i):
        return None
    a = _attrs(node)
    # dtype and rank: writers differ (ORT's RTN stores scales [N, blocks], ours and HQQ flat)
    layout = tuple((inits[i].data_type, len(inits[i].dims)) for i in node.input[1:] if i)
    return (node.input[0], a["K"], a["bits"], a["block_size"], a.get("accuracy_level", 0), node.doc_string,
            given, layout)


def sibling_groups(model, float_matmuls: bool = False) -> list[list]:
    """Lists of two or more nodes that :func:`fuse_siblings` would merge, in graph order."""
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[tuple, list] = collections.defaultdict(list)
    for n in model.graph.node:
        k = _key(n, inits, float_matmuls)
        if k is not None:
            groups[k].append(n)
    return [ns for ns in groups.values() if len(ns) > 1]


def _fused_float(nodes: list, inits: dict, name: str):
    """(one MatMul over the weights concatenated along N, its weight, the Split's sizes)."""
    from onnx import helper, numpy_helper

    ws = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
    w = numpy_helper.from_array(np.concatenate(ws, axis=1), f"{name}.weight")
    node = helper.make_node("MatMul", [nodes[0].input[0], w.name], [f"{name}.out"], name=name)
    return node, [w], [x.shape[1] for x in ws]


def _fused(nodes: list, inits: dict, name: str):
    """(the fused MatMulNBits node, its new initializers, the Split's sizes)."""
    from onnx import helper, numpy_helper

    first = nodes[0]
    if first.op_type == "MatMul":
        return _fused_float(nodes, inits, name)
    sizes = [_attrs(n)["N"] for n in nodes]
    new_inits, inputs = [], [first.input[0]]
    for k in range(1, len(first.input)):
        if not first.input[k]:
            inputs.append("")
            continue
        cat = np.concatenate([numpy_helper.to_array(inits[n.input[k]]) for n in nodes], axis=0)
        new_inits.append(numpy_helper.from_array(cat, f"{name}.input{k}"))
        inputs.append(new_inits[-1].name)
    attrs = {**_attrs(first), "N": int(sum(sizes))}
    node = helper.make_node("MatMulNBits", inputs, [f"{name}.out"], name=name, domain="com.microsoft",
                            doc_string=first.doc_string or None, **attrs)
    return node, new_inits, sizes


def _reads(graph) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs reads, and its outputs."""
    from onnx import AttributeProto

    names = {o.name for o in graph.output}
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            subs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                names |= _reads(sub)
    return names


# the names _fused and the Split derive from a fused node's name
_DERIVED = ("", ".out", ".split", ".weight") + tuple(f".input{k}" for k in range(1, 6))


def _unique(base: str, taken: set[str]) -> str:
    """``base`` (or ``base.<i>``) such that no name derived from it is taken yet; marks them taken."""
    name, i = base, 1
    while any(name + d in taken for d in _DERIVED):
        name, i = f"{base}.{i}", i + 1
    taken.update(name + d for d in _DERIVED)
    return name


def fuse_siblings(model, float_matmuls: bool = False) -> int:
    """Merge every group of :func:`sibling_groups` into one node + Split, in place; returns how
    many groups were merged. The old nodes' weights are dropped where nothing else reads them."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    taken = {n.name for n in g.node} | set(inits) | {v.name for v in g.value_info} | {i.name for i in g.input}
    taken |= {o for n in g.node for o in n.output}
    groups = sibling_groups(model, float_matmuls)
    old_weights: set[str] = set()
    for ns in groups:
        name = _unique("fused." + "+".join(n.name or n.output[0] for n in ns), taken)
        old_weights.update(i for n in ns for i in n.input[1:] if i)
        node, new_inits, sizes = _fused(ns, inits, name)
        split_sizes = numpy_helper.from_array(np.asarray(sizes, np.int64), f"{name}.split")
        split = helper.make_node("Split", [node.output[0], split_sizes.name], [n.output[0] for n in ns],
                                 name=f"{name}.split", axis=-1)
        # The first sibling's place: the shared input exists there, and every output is then
        # written no later than before, so the graph stays topologically sorted.
        pos = list(g.node).index(ns[0])
        for n in ns:
            g.node.remove(n)
        g.node.insert(pos, split)
        g.node.insert(pos, node)
        g.initializer.extend([*new_inits, split_sizes])
    if groups:
        read = _reads(g)
        for t in [t for t in g.initializer if t.name in old_weights and t.name not in read]:
            g.initializer.remove(t)
    return len(groups)


def fuse_siblings_file(path: Path) -> int:
    """:func:`fuse_siblings` on the model at ``path`` (rewritten in place when anything was merged)."""
    import onnx

    model = onnx.load(str(path))
    count = fuse_siblings(model)
    if count:
        onnx.save(model, str(path))
    return count
