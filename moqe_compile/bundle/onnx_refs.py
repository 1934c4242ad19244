"""What the bundle reader needs to know of a serialized ONNX model before ONNX Runtime sees it:
which tensors keep their data in external files, and the graph's output shapes.

The runtime installs no ``onnx`` package (base install: numpy, onnxruntime, pillow), so the
model is parsed with ``protobuf`` (an onnxruntime dependency) through a descriptor that
declares only the fields on the way to a tensor's external-data record, with the field
numbers of onnx.proto; protobuf skips every other field. Tensors are found wherever ONNX
Runtime can load one: graph initializers (dense and sparse), tensor attributes of nodes
(Constant), and the subgraphs and functions that hold such nodes.
"""

from __future__ import annotations

import functools

from moqe_compile.errors import BundleError

EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# (message, [(field, number, type, label, message type)]) with onnx.proto's field numbers.
_MSG, _STR, _ENUM_AS_INT, _INT64 = 11, 9, 5, 3
_OPT, _REP = 1, 3
_MESSAGES = [
    ("Entry", [("key", 1, _STR, _OPT, None), ("value", 2, _STR, _OPT, None)]),
    ("Tensor", [("name", 8, _STR, _OPT, None), ("external_data", 13, _MSG, _REP, "Entry"),
                ("data_location", 14, _ENUM_AS_INT, _OPT, None)]),
    ("Sparse", [("values", 1, _MSG, _OPT, "Tensor"), ("indices", 2, _MSG, _OPT, "Tensor")]),
    ("Attribute", [("t", 5, _MSG, _OPT, "Tensor"), ("g", 6, _MSG, _OPT, "Graph"),
                   ("tensors", 10, _MSG, _REP, "Tensor"), ("graphs", 11, _MSG, _REP, "Graph"),
                   ("sparse_tensor", 22, _MSG, _OPT, "Sparse"), ("sparse_tensors", 23, _MSG, _REP, "Sparse")]),
    ("Node", [("attribute", 5, _MSG, _REP, "Attribute")]),
    ("Dim", [("dim_value", 1, _INT64, _OPT, None), ("dim_param", 2, _STR, _OPT, None)]),
    ("Shape", [("dim", 1, _MSG, _REP, "Dim")]),
    ("TensorType", [("shape", 2, _MSG, _OPT, "Shape")]),
    ("Type", [("tensor_type", 1, _MSG, _OPT, "TensorType")]),
    ("ValueInfo", [("name", 1, _STR, _OPT, None), ("type", 2, _MSG, _OPT, "Type")]),
    ("Graph", [("node", 1, _MSG, _REP, "Node"), ("initializer", 5, _MSG, _REP, "Tensor"),
               ("output", 12, _MSG, _REP, "ValueInfo"), ("sparse_initializer", 15, _MSG, _REP, "Sparse")]),
    ("Function", [("node", 7, _MSG, _REP, "Node")]),
    ("Model", [("graph", 7, _MSG, _OPT, "Graph"), ("functions", 25, _MSG, _REP, "Function")]),
]


@functools.cache
def _model_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="moqe_onnx_refs.proto", package="moqe_onnx_refs", syntax="proto2")
    for name, fields in _MESSAGES:
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = f".moqe_onnx_refs.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("moqe_onnx_refs.Model"))


def _tensors(graph):
    """Every tensor a graph holds, its subgraphs' included."""
    yield from graph.initializer
    for s in graph.sparse_initializer:
        yield from (s.values, s.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for s in [a.sparse_tensor, *a.sparse_tensors]:
                yield from (s.values, s.indices)
            for g in [a.g, *a.graphs]:
                yield from _tensors(g)


def parse(model: bytes, rel: str):
    """The parts of ``model`` this module declares, or a ``BundleError`` naming ``rel``."""
    from google.protobuf.message import DecodeError

    m = _model_class()()
    try:
        m.ParseFromString(model)
    except (DecodeError, RecursionError) as e:
        raise BundleError(f"graph {rel!r} is not a valid ONNX model: {e}.") from e
    return m


def external_tensors(m) -> list:
    """Every tensor of parsed model ``m`` (this module's or onnx's ``ModelProto``) stored as
    external data, its functions' and subgraphs' included."""
    tensors = [*_tensors(m.graph)]
    for fn in m.functions:
        tensors += _node_tensors(fn.node)
    return [t for t in tensors if t.data_location == EXTERNAL or len(t.external_data)]


def external_data(m) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor of parsed model ``m`` stored as external data."""
    return [(t.name, next((e.value for e in t.external_data if e.key == "location"), "")) for t in external_tensors(m)]


def output_shapes(m) -> dict[str, list[int | str | None]]:
    """Each graph output's shape: an int per fixed dimension, the name of a symbolic one, None
    where the graph says nothing."""
    def dim(d):
        return d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)

    return {o.name: [dim(d) for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
