"""Fill in missing dtypes and shapes of intermediate values with onnx shape inference.

Rules that must prove a node is a no-op (a Cast to the same type, a Reshape to the same shape) need the
dtype and shape of its input; exported models often carry no ``value_info`` for intermediate values.
``fill_missing`` runs onnx's (non-strict) shape inference on a copy of the model with the big initializers
lifted out and copies back only what was missing or less precise. Graph inputs, outputs and
initializers are never touched, so the interface cannot change.

Passes run one after another in a fixed-point loop, and each asks for the values its rules need. So
that inference runs once for all of them, not once per pass and iteration, every value still lacking
information after an inference is marked with the state of its producer's inputs (objects, dtypes,
shapes). Inference runs again only when a wanted value lacks information and some value of the model
is ``stale``: it lacks information and its producer's inputs changed since (a rewrite gave the node
another input, or an input gained a shape), or its producer is new. A rewrite anywhere upstream
shows up that way, so what it makes inferable downstream is found.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx
import onnx_ir as ir

from onnxshrink.checks import lifted_proto

logger = logging.getLogger(__name__)


_TRIED = "onnxshrink.shape_inference_tried"


def lacks_info(value: ir.Value | None) -> bool:
    """Whether ``value`` misses its dtype or its shape (symbolic dimensions count as known)."""
    return value is not None and (value.dtype is None or value.shape is None)


def _state(value: ir.Value) -> tuple:
    """What shape inference of ``value`` depends on locally: its producer and that node's inputs."""
    node = value.producer()
    if node is None:
        return ()
    return (id(node), *((id(v), v.dtype, None if v.shape is None else tuple(v.shape)) if v is not None
                        else None for v in node.inputs))


def stale(value: ir.Value | None) -> bool:
    """Whether ``value`` lacks information and no inference was tried since its producer's inputs changed."""
    return lacks_info(value) and value.meta.get(_TRIED) != _state(value)


def any_stale(model: ir.Model, graphs: list | None = None) -> bool:
    """Whether a value of the main graph or its subgraphs is ``stale``."""
    graphs = list(model.graphs()) if graphs is None else graphs
    return any(stale(v) for graph in graphs for node in graph for v in node.outputs)


def _mark_tried(graphs: list) -> None:
    for graph in graphs:
        for node in graph:
            for value in node.outputs:
                if lacks_info(value):
                    value.meta[_TRIED] = _state(value)


def fill_missing(model: ir.Model, wanted: Iterable[ir.Value | None] = ()) -> int:
    """Infer shapes when a ``wanted`` value of the main graph (or its subgraphs) lacks information and
    something changed since the last inference (a value of the model is ``stale``).

    Returns how many values gained information. Inference failures are logged and ignored: the rules
    that need the information then simply do not fire.
    """
    graphs = list(model.graphs())
    main_graphs = set(graphs)
    if not any(lacks_info(v) and v.graph in main_graphs for v in wanted) or not any_stale(model, graphs):
        return 0
    try:
        with lifted_proto(model) as proto:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                                         data_prop=True)
        filled = _fill_graph(model.graph, inferred.graph)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        logger.info("shape inference failed, rules needing shapes may not fire: %s", e)
        _mark_tried(graphs)
        return 0
    _mark_tried(graphs)
    logger.debug("shape inference filled %d values", filled)
    return filled


def _fill_graph(graph: ir.Graph, proto: onnx.GraphProto) -> int:
    """Merge the inferred ``value_info`` of ``proto`` into the node outputs of ``graph`` (and of its
    subgraphs), matched by position and name; only the types are read, nothing else is parsed."""
    if len(graph) != len(proto.node):
        return 0  # the graphs do not line up; never guess
    infos = {vi.name: vi.type for vi in proto.value_info}
    filled = 0
    for node, node_proto in zip(graph, proto.node):
        if node.op_type != node_proto.op_type or len(node_proto.output) != len(node.outputs):
            break
        for value in node.outputs:
            type_proto = infos.get(value.name) if value.name and not _complete(value) else None
            if type_proto is not None:
                filled += _merge(value, type_proto)
        for attr in node_proto.attribute:
            ir_attr = node.attributes.get(attr.name)
            if ir_attr is None:
                continue
            if attr.type == onnx.AttributeProto.GRAPH and ir_attr.type == ir.AttributeType.GRAPH:
                filled += _fill_graph(ir_attr.value, attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS and ir_attr.type == ir.AttributeType.GRAPHS:
                filled += sum(_fill_graph(g, gp) for g, gp in zip(ir_attr.value, attr.graphs))
    return filled


def _complete(value: ir.Value) -> bool:
    """Whether ``value`` has its type and a fully static shape: inference cannot add anything."""
    return value.type is not None and value.shape is not None and value.shape.is_static()


def _merge(value: ir.Value, type_proto: onnx.TypeProto) -> int:
    if value.is_graph_output():
        return 0
    changed = 0
    if value.type is None:
        if type_proto.WhichOneof("value") == "tensor_type":
            elem = type_proto.tensor_type.elem_type
            source_type = ir.TensorType(ir.DataType(elem)) if elem else None
        else:  # a sequence stays a sequence, an optional an optional
            source_type = ir.serde.deserialize_type_proto_for_type(type_proto)
        if source_type is not None and getattr(source_type, "dtype", None) != ir.DataType.UNDEFINED:
            value.type = source_type
            changed = 1
    new = _proto_dims(type_proto)
    if new is None:
        return changed
    old = value.shape
    if old is None:
        value.shape = ir.Shape(new)
        return 1
    if len(old) != len(new) or not any(isinstance(n, int) and not isinstance(o, int) for o, n in zip(old, new)):
        return changed
    value.shape = ir.Shape([o if isinstance(o, int) or not isinstance(n, int) else n for o, n in zip(old, new)])
    return 1


def _proto_dims(type_proto: onnx.TypeProto) -> list | None:
    """The dims of a tensor type (ints, dim_param names, None), read straight from the proto."""
    if type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in type_proto.tensor_type.shape.dim]
