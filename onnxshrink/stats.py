"""Model statistics: op histogram, node and parameter counts, initializer bytes, a MACs estimate."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir

from onnxshrink import checks, model_io
from onnxshrink.graph_utils import int_attr

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.DOUBLE,
}


def op_histogram(model: ir.Model) -> Counter:
    """Node count per op type over every graph and subgraph (functions counted separately)."""
    hist: Counter = Counter()
    for node in model.graph.all_nodes():
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        hist[key] += 1
    return hist


def _constant_node_tensors(model: ir.Model):
    """Tensors held by Constant nodes (some exporters store every weight that way)."""
    for node in model.graph.all_nodes():
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes:
            yield node.attributes["value"].as_tensor()


def _weight_tensors(model: ir.Model):
    yield from model_io.iter_initializer_tensors(model)
    yield from _constant_node_tensors(model)


def parameter_count(model: ir.Model) -> int:
    """Elements of every weight: initializers and Constant-node tensors (quantized weights too)."""
    return sum(int(np.prod(t.shape.numpy())) for t in _weight_tensors(model))


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer and Constant-node tensor."""
    return sum(t.nbytes for t in _weight_tensors(model))


class Shapes(dict):
    """Value name -> concrete shape; ``unresolved``: the values with a dim inference could not tie to
    an input dim (no value, no input's name), which count as 1 like unknown input dims do."""

    def __init__(self) -> None:
        super().__init__()
        self.unresolved: set[str] = set()


def inferred_shapes(model: ir.Model, dims: dict[str, int] | None = None, *, fold: bool = True) -> Shapes:
    """Value name -> concrete shape after onnx shape inference, subgraphs included.

    Symbolic or unknown input dims take values from ``dims`` (by dim name, or ``input:axis``) before
    inference; dims still unknown afterwards count as 1. Where inference leaves a weight op's shape
    unresolved (a length computed by shape arithmetic onnx cannot follow, as in exported STFT front
    ends, or read from ``Shape`` at run time), those values take their shapes from a copy pinned to
    the given size and folded (``fold``: ``pipeline.pre_prune_steps``), which computes
    the same thing with those shapes constant; ``unresolved`` still names them.
    """
    if dims:
        from onnxshrink import data

        data.check_dims(data.input_specs(model), dims)
    shapes = _infer(model, dims or {})
    unresolved = [n for n in model.graph.all_nodes() if n.op_type in MAC_OPS and _unresolved(n, shapes)]
    if fold and unresolved:
        folded = _folded_copy(model, dims)
        if folded is not None:
            more = _infer(folded, dims or {})
            shapes.update({k: v for k, v in more.items() if k not in shapes or k in shapes.unresolved})
            _through_nodes(unresolved, folded, more, shapes)
    return shapes


def _through_nodes(nodes, folded: ir.Model, more: Shapes, shapes: Shapes) -> None:
    """Folding may remove the value that feeds a weight op (a ``Mul`` by 1 between ``Reshape`` and
    ``MatMul``): take the first input's and output's shapes from the folded copy's node of the same
    name and op instead, where it has them resolved."""
    by_name = {n.name: n for n in folded.graph.all_nodes() if n.name}
    for node in nodes:
        twin = by_name.get(node.name)
        if twin is None or twin.op_type != node.op_type:
            continue
        for mine, theirs in ((node.inputs[:1], twin.inputs[:1]), (node.outputs[:1], twin.outputs[:1])):
            for v, t in zip(mine, theirs):
                if v is not None and t is not None and t.name in more and t.name not in more.unresolved \
                        and (v.name not in shapes or v.name in shapes.unresolved):
                    shapes[v.name] = more[t.name]
                    shapes.unresolved.discard(v.name)


def _infer(model: ir.Model, dims: dict[str, int]) -> Shapes:
    shapes = Shapes()
    try:
        with checks.lifted_proto(model) as proto:
            _pin_input_dims(proto.graph, model, dims)
            _clear_negative_dims(proto.graph)
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:  # noqa: BLE001
        logger.info("shape inference failed, MACs estimate incomplete: %s", e)
        return shapes
    inputs = {d.dim_param for vi in inferred.graph.input for d in vi.type.tensor_type.shape.dim}
    _collect_shapes(inferred.graph, dims, shapes, inputs - {""})
    for graph in model.graphs():
        for init in graph.initializers.values():
            if init.const_value is not None:
                shapes[init.name] = tuple(init.const_value.shape.numpy())
    return shapes


def _pin_input_dims(graph: onnx.GraphProto, model: ir.Model, dims: dict[str, int]) -> None:
    if not dims:
        return
    inits = set(model.graph.initializers)
    for vi in graph.input:
        if vi.name in inits or not vi.type.tensor_type.HasField("shape"):
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            value = dims.get(d.dim_param) if d.dim_param else None
            value = dims.get(f"{vi.name}:{i}", value)
            if value is not None:
                d.dim_value = int(value)


def _clear_negative_dims(graph: onnx.GraphProto) -> None:
    """Paddle exports write -1 for a dynamic dim; a -1 left in a value's shape (a pruned model keeps the
    input's) contradicts the pinned size, and inference then keeps the stale dims. Make them unknown."""
    for g in model_io.proto_graphs(graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    d.ClearField("dim_value")


def _collect_shapes(graph: onnx.GraphProto, dims: dict[str, int], shapes: Shapes, inputs: set[str]) -> None:
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        if any(not (d.HasField("dim_value") and d.dim_value >= 0) and d.dim_param not in inputs
               for d in t.shape.dim):
            shapes.unresolved.add(vi.name)
        shapes[vi.name] = tuple(
            d.dim_value
            if d.HasField("dim_value") and d.dim_value >= 0  # Paddle exports write -1 for dynamic
            else int(dims.get(d.dim_param, 1))
            for d in t.shape.dim
        )
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect_shapes(attr.g, dims, shapes, inputs)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _collect_shapes(sub, dims, shapes, inputs)


def _prod(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def node_macs(node: ir.Node, shapes: dict[str, tuple]) -> int:
    """Multiply-accumulates of one Conv/ConvTranspose/MatMul/Gemm-like or recurrent (LSTM, GRU, RNN)
    node (0 if unknown)."""
    def shp(i):
        v = node.inputs[i] if i < len(node.inputs) else None
        return shapes.get(v.name) if v is not None else None

    out = shapes.get(node.outputs[0].name) if node.outputs else None
    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shp(3 if op == "QLinearConv" else 1)
        if w and out:
            return _prod(out) * _prod(w[1:])
    elif op == "ConvTranspose":
        x, w = shp(0), shp(1)
        if x and w:
            return _prod(x) * _prod(w[1:])
    elif op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):
        a = shp(0)
        if a and out:
            k = a[0] if (op == "Gemm" and int_attr(node, "transA", 0)) else a[-1]
            return _prod(out) * k
    elif op in _RECURRENT:
        x, hidden = shp(0), int_attr(node, "hidden_size", 0)
        if x and len(x) == 3 and hidden:
            direction = node.attributes.get("direction")
            dirs = 2 if direction is not None and direction.as_string() == "bidirectional" else 1
            return dirs * x[0] * x[1] * _RECURRENT[op] * hidden * (x[2] + hidden)  # [T, B, I] or [B, T, I]
    return 0


#: Recurrent ops: gates per step (each a [I + H] x H product per direction, step and sequence).
_RECURRENT = {"LSTM": 4, "DynamicQuantizeLSTM": 4, "GRU": 3, "RNN": 1}


def macs(model: ir.Model, dims: dict[str, int] | None = None, *, fold: bool = True) -> int:
    """Estimated multiply-accumulates of one run (Conv, ConvTranspose, MatMul, Gemm, LSTM/GRU/RNN and
    their quantized forms); dims not fixed by the model or ``dims`` count as 1. Shapes as
    :func:`inferred_shapes` gives them (``fold``), so an input model and its optimized output are
    counted alike."""
    shapes = inferred_shapes(model, dims, fold=fold)
    return sum(node_macs(n, shapes) for n in model.graph.all_nodes() if n.op_type in MAC_OPS)


MAC_OPS = frozenset({"Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "MatMul", "MatMulInteger",
                     "QLinearMatMul", "Gemm", *_RECURRENT})


def _unresolved(node: ir.Node, shapes: Shapes) -> bool:
    return any(v is not None and (v.name not in shapes or v.name in shapes.unresolved)
               for v in (*node.inputs[:1], *node.outputs[:1]))


def _folded_copy(model: ir.Model, dims: dict[str, int] | None = None) -> ir.Model | None:
    """A copy of ``model`` with its inputs pinned to the counted size (``dims``, other symbolic dims 1,
    as counting takes them) and folded, so that shapes computed at run time (``Shape`` -> ``Reshape``)
    become constants."""
    from onnxshrink import data, graph_utils, pipeline

    copy = graph_utils.clone_model(model)
    steps = pipeline.pre_prune_steps()
    try:
        pinned = {s.name: s.concrete_shape(dims) for s in data.input_specs(copy)}
        for v in copy.graph.inputs:
            if v.name in pinned and v.shape is not None:
                v.shape = ir.Shape(pinned[v.name])
        _forget_symbolic_shapes(copy)
        pipeline.Pipeline(steps, []).run(copy)
    except Exception as e:  # noqa: BLE001 - the count falls back to the unfolded shapes
        logger.info("folding for the MACs count failed: %s", e)
        return None
    return copy


def _forget_symbolic_shapes(model: ir.Model) -> None:
    """Drop node outputs' shapes that still hold a symbolic or unknown dim (an earlier inference on the
    unpinned model: ``[-1, 8, unk__0, unk__1]``), so inference on the pinned copy derives them again;
    kept, onnx can keep stale symbols and they count as 1 (silero-vad's opset-15 export: 128 MACs
    fewer after cleanup). Outputs of ops outside the standard domain keep theirs: onnx cannot derive
    them again (ddddocr's DynamicQuantizeLSTM; dropped, the reshape after it went uncounted)."""
    for node in model.graph.all_nodes():
        if node.domain not in ("", "ai.onnx"):
            continue
        for v in node.outputs:
            if v.shape is not None and not all(isinstance(d, int) and d >= 0 for d in v.shape):
                v.shape = None


def unset_dims(model: ir.Model, dims: dict[str, int] | None = None) -> list[str]:
    """The inputs' symbolic dims that ``dims`` leaves unset, which MACs counts take as 1: a dim's name,
    or ``input:axis`` for one without a name, each once."""
    from onnxshrink import data

    dims = dims or {}
    out: list[str] = []
    for spec in data.input_specs(model):
        for axis, d in enumerate(spec.dims):
            key = d if isinstance(d, str) else f"{spec.name}:{axis}"
            if not isinstance(d, int) and key not in dims and f"{spec.name}:{axis}" not in dims and key not in out:
                out.append(key)
    return out


def summarize(model: ir.Model, path=None, *, with_macs: bool = True, dims=None) -> dict:
    """A dict summary used by the before/after table and ``inspect``."""
    hist = op_histogram(model)
    out = {
        "nodes": sum(hist.values()),
        "ops": dict(sorted(hist.items())),
        "parameters": parameter_count(model),
        "initializer_bytes": weight_bytes(model),
        "functions": len(model.functions),
    }
    if with_macs:
        out["macs"] = macs(model, dims)
        out["macs_dims_as_1"] = unset_dims(model, dims)
    if path is not None:
        out["file_bytes"] = model_io.file_size(path)
    return out


def io_signature(model: ir.Model) -> dict:
    def desc(v: ir.Value) -> dict:
        dims = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
        return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": dims}

    inits = set(model.graph.initializers)
    return {
        "inputs": [desc(v) for v in model.graph.inputs if v.name not in inits],
        "outputs": [desc(v) for v in model.graph.outputs],
    }


def external_files(model: ir.Model) -> list[str]:
    return sorted(
        {str(t.location) for t in model_io.iter_initializer_tensors(model) if isinstance(t, ir.ExternalTensor)}
    )
