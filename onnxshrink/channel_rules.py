"""Per-op channel rules of the pruning dependency graph (the table, ``RULES``, is in depgraph.py).

A channel slot is a value and a tuple of its axes (one axis, or several for a head split such as
``[N,S,H,d]`` axes (2, 3)); its cells are the multi-indices over those axes, numbered in row-major
order of the tuple. A rule is called for one node and one slot reaching it at one of the node's ports
(``("in", i)`` or ``("out", j)``) and returns either a list of :class:`Link` (this slot's cells must be
removed together with the linked cells of another slot; ``src``/``dst`` give the index pairs, None
for identity) or a :class:`Barrier` saying why channels cannot pass.

Most rules label every axis of every operand, einsum style: axes with the same label are the same
channels. A slot label that no other operand carries is projected away (spatial axes of a Conv or a
pool: removing a feature means removing its whole channel), except labels a rule names in ``stop``
(normalization and reduction over channels change the kept channels' values, so they are barriers).
Ops missing from ``RULES`` are barriers. Grouped Conv, Concat, Split, Slice and Reshape-family ops map
indices with offsets, residues and flatten strides.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxshrink.checks import lifted_proto
from onnxshrink.graph_utils import attr_value, const_array

logger = logging.getLogger(__name__)

Port = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class Barrier:
    reason: str


@dataclasses.dataclass
class Link:
    """Cells ``src`` of the source slot go with cells ``dst`` of slot ``(value, axes)`` (None: identity)."""

    value: ir.Value
    axes: tuple[int, ...]
    src: np.ndarray | None = None
    dst: np.ndarray | None = None


@dataclasses.dataclass
class Ctx:
    """What rules may look at: static shapes by value, and options."""

    shapes: dict
    grouped: str = "auto"  # "auto": depthwise ties groups, other grouped convs prune within groups

    def shape(self, value: ir.Value | None):
        return None if value is None else self.shapes.get(value)

    def dims(self, value: ir.Value, axes: Sequence[int]) -> tuple[int, ...] | None:
        shape = self.shape(value)
        if shape is None or any(a >= len(shape) for a in axes):
            return None
        out = tuple(shape[a] for a in axes)
        return out if all(isinstance(d, int) for d in out) else None


def infer_shapes(model: ir.Model) -> dict[ir.Value, tuple]:
    """Static shapes of every main-graph value (symbolic dims as strings, unknown as None); pure."""
    shapes: dict[ir.Value, tuple] = {}
    graph = model.graph
    try:
        with lifted_proto(model) as proto:
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        logger.info("shape inference failed; falling back to the shapes the model carries: %s", e)
        inferred = None
    by_name = {}
    if inferred is not None:
        for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
            t = vi.type.tensor_type
            if t.HasField("shape"):
                by_name[vi.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
                )
    for v in _main_values(graph):
        if v.const_value is not None:
            shapes[v] = tuple(int(d) for d in v.const_value.shape)
        elif v.name in by_name:
            shapes[v] = by_name[v.name]
        elif v.shape is not None:
            shapes[v] = tuple(d if isinstance(d, int) else (str(d) if d.value else None) for d in v.shape)
    return shapes


def _main_values(graph: ir.Graph):
    seen = set()
    for v in [*graph.inputs, *graph.initializers.values()]:
        seen.add(v)
        yield v
    for node in graph:
        for v in [*node.inputs, *node.outputs]:
            if v is not None and v not in seen:
                seen.add(v)
                yield v


Result = list[Link] | Barrier
RuleFn = Callable[[ir.Node, Port, tuple, Ctx], Result]


def operand(node: ir.Node, port: Port) -> ir.Value | None:
    kind, i = port
    seq = node.inputs if kind == "in" else node.outputs
    return seq[i] if i < len(seq) else None


# ---------------------------------------------------------------- label mapping


def label_links(node, port, axes, ctx, labels: dict, stop: Sequence[str] = ()) -> Result:
    """Link the slot to every operand that carries its labels. ``labels``: port -> label tuple."""
    value = operand(node, port)
    own = labels.get(port)
    if own is None or value is None:
        return Barrier(f"{node.op_type} does not carry channels on this operand")
    slot_labels = [own[a] for a in axes]
    if any(lab in stop for lab in slot_labels):
        return Barrier(f"{node.op_type} normalizes or reduces over the channel axis")
    src_dims = ctx.dims(value, axes)
    if src_dims is None:
        return Barrier("channel dimension not static")
    links: list[Link] = []
    for other, lab in labels.items():
        v = operand(node, other)
        if other == port or v is None or lab is None:
            continue
        keep = [i for i, name in enumerate(slot_labels) if name in lab]
        if not keep:
            continue
        tgt_axes = tuple(lab.index(slot_labels[i]) for i in keep)
        if ctx.dims(v, tgt_axes) != tuple(src_dims[i] for i in keep):
            return Barrier(f"{node.op_type}: operand dims do not match the channel dims")
        links.append(projection(v, tgt_axes, src_dims, keep))
    return links


def projection(value, tgt_axes, src_dims, keep) -> Link:
    """A link keeping the coordinates ``keep`` of the source cells (identity when all are kept)."""
    if list(keep) == list(range(len(src_dims))):
        return Link(value, tuple(tgt_axes))
    src = np.arange(int(np.prod(src_dims)))
    coords = np.unravel_index(src, src_dims)
    dst = np.ravel_multi_index([coords[i] for i in keep], [src_dims[i] for i in keep])
    return Link(value, tuple(tgt_axes), src, dst)


def _broadcast_labels(shape, out_shape, prefix: str, tag: str) -> tuple:
    """Labels of an operand broadcast (right-aligned) to ``out_shape``; size-1 axes get own labels."""
    r, ro = len(shape), len(out_shape)
    labs = []
    for j, d in enumerate(shape):
        o = j + ro - r
        same = o >= 0 and d is not None and d == out_shape[o] and not (d == 1 and out_shape[o] != 1)
        labs.append(f"{prefix}{o}" if same else f"bc{tag}_{j}")
    return tuple(labs)


def _elementwise_labels(node, ctx, inputs: Sequence[int] | None = None) -> dict | None:
    out_shape = ctx.shape(node.outputs[0])
    if out_shape is None:
        return None
    labels = {("out", 0): tuple(f"e{i}" for i in range(len(out_shape)))}
    for i, v in enumerate(node.inputs):
        if v is None or (inputs is not None and i not in inputs):
            continue
        shape = ctx.shape(v)
        if shape is None:
            return None
        labels[("in", i)] = _broadcast_labels(shape, out_shape, "e", str(i))
    return labels


def _needs_shapes(fn):
    def rule(node, port, axes, ctx):
        labels = fn(node, ctx)
        if labels is None:
            return Barrier(f"{node.op_type}: shapes unknown")
        if isinstance(labels, Barrier):
            return labels
        labels, stop = labels if isinstance(labels, tuple) else (labels, ())
        return label_links(node, port, axes, ctx, labels, stop)

    rule.__doc__ = fn.__doc__
    return rule


# ---------------------------------------------------------------- simple families


@_needs_shapes
def elementwise(node, ctx):
    """Add/Sub/Mul/Div/...: all full-size operands coupled (residuals); broadcast operands sliced along."""
    if len(node.outputs) != 1:
        return Barrier(f"{node.op_type} with several outputs")
    return _elementwise_labels(node, ctx)


@_needs_shapes
def unary(node, ctx):
    """Activations, Identity, Cast, Dropout: every axis passes through."""
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return Barrier(f"{node.op_type}: a second output (mask) is used")
    return _elementwise_labels(node, ctx, inputs=[0])


@_needs_shapes
def batchnorm(node, ctx):
    """BatchNormalization/InstanceNormalization: per-channel parameters sliced with the channel."""
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return Barrier("BatchNormalization in training mode (running stats used)")
    shape = ctx.shape(node.inputs[0])
    if shape is None or len(shape) < 2:
        return None
    own = ("n", "c", *(f"s{i}" for i in range(len(shape) - 2)))
    labels = {("in", 0): own, ("out", 0): own}
    for i in range(1, len(node.inputs)):
        labels[("in", i)] = ("c",)
    stop = own[2:] if node.op_type == "InstanceNormalization" else ()
    return labels, stop


@_needs_shapes
def pool(node, ctx):
    """Pooling: batch and channel pass; spatial axes change size (projected away)."""
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return Barrier("MaxPool indices output is used")
    shape, out = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if shape is None or out is None:
        return None
    return {
        ("in", 0): ("n", "c", *(f"x{i}" for i in range(len(shape) - 2))),
        ("out", 0): ("n", "c", *(f"y{i}" for i in range(len(out) - 2))),
    }


@_needs_shapes
def resize(node, ctx):
    """Resize/Upsample: batch and channel pass when their scale is 1 (sizes inputs are barriers)."""
    sizes = node.inputs[3] if len(node.inputs) > 3 else None
    if sizes is not None:
        return Barrier("Resize by sizes (the channel count is written in the sizes)")
    out = ctx.shape(node.outputs[0])
    shape = ctx.shape(node.inputs[0])
    if shape is None or out is None or len(shape) != len(out) or len(shape) < 2:
        return None
    if not isinstance(shape[1], int) or shape[1] != out[1]:
        return Barrier("Resize changes the channel dimension")
    scales = node.inputs[2] if len(node.inputs) > 2 else None
    arr = const_array(scales) if scales is not None else None
    if scales is not None and (arr is None or (arr.size >= 2 and (arr[0] != 1 or arr[1] != 1))):
        return Barrier("Resize scales the batch or channel axis (or its scales are computed)")
    return {
        ("in", 0): ("n", "c", *(f"x{i}" for i in range(len(shape) - 2))),
        ("out", 0): ("n", "c", *(f"y{i}" for i in range(len(out) - 2))),
    }


@_needs_shapes
def transpose(node, ctx):
    """Transpose: axes follow the permutation."""
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        return None
    perm = attr_value(node, "perm") or list(reversed(range(len(shape))))
    own = tuple(f"t{i}" for i in range(len(shape)))
    return {("in", 0): own, ("out", 0): tuple(own[p] for p in perm)}


@_needs_shapes
def softmax(node, ctx):
    """Softmax/LogSoftmax/Hardmax: other axes pass; the normalized axis is a barrier."""
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        return None
    r = len(shape)
    own = tuple(f"a{i}" for i in range(r))
    axis = attr_value(node, "axis", -1)
    axis = axis + r if axis < 0 else axis
    stop = own[axis:] if _opset(node) < 13 else (own[axis],)
    return {("in", 0): own, ("out", 0): own}, stop


def _opset(node: ir.Node) -> int:
    graph = node.graph
    while graph is not None and not isinstance(graph, ir.Graph):
        graph = getattr(graph, "graph", None)
    imports = graph.opset_imports if isinstance(graph, ir.Graph) else {}
    return int(imports.get("", imports.get("ai.onnx", 17)))


@_needs_shapes
def reduce(node, ctx):
    """Reduce*: kept axes pass; reducing over a channel axis is a barrier."""
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        return None
    r = len(shape)
    axes = attr_value(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        if arr is None:
            return Barrier("Reduce axes computed at run time")
        axes = [int(a) for a in arr.reshape(-1)]
    if not axes:
        axes = [] if attr_value(node, "noop_with_empty_axes", 0) else list(range(r))
    axes = {a + r if a < 0 else a for a in axes}
    own = tuple(f"r{i}" for i in range(r))
    keepdims = attr_value(node, "keepdims", 1)
    out = tuple((f"k{i}" if i in axes else own[i]) for i in range(r) if keepdims or i not in axes)
    return {("in", 0): own, ("out", 0): out}, tuple(own[i] for i in axes)


def constant(node, port, axes, ctx) -> Result:
    """Constant nodes: a source of values, nothing to couple."""
    return []


def gather(node, port, axes, ctx) -> Result:
    """Gather: axes other than the gathered one pass (shifted by the indices' rank). With a constant
    scalar index (q, k or v taken from a packed projection) a slot on the gathered axis passes too:
    the picked index's cells go on without that axis. Refuses computed or non-scalar indices on a
    channel axis, channels on the indices' axes, and a slot on the gathered axis alone."""
    x, y = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    ishape = ctx.shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if port not in (("in", 0), ("out", 0)) or x is None or y is None or ishape is None:
        return Barrier("Gather: shapes unknown or a channel reaches its indices")
    axis = int(attr_value(node, "axis", 0))
    axis, q = axis + len(x) if axis < 0 else axis, len(ishape)
    idx = const_array(node.inputs[1])
    pick = idx is not None and idx.ndim == 0 and isinstance(x[axis], int)
    on_axis = axis in axes if port == ("in", 0) else any(axis <= a < axis + q for a in axes)
    if pick and (on_axis or port == ("out", 0)):
        if port == ("in", 0) and tuple(axes) == (axis,):
            return Barrier("Gather picks one channel of the channel axis")
        return _pick_links(node, port, tuple(axes), ctx, axis, int(idx) % x[axis])
    if on_axis:
        return Barrier("Gather along a channel axis with computed or non-scalar indices")
    own = tuple(f"a{i}" for i in range(len(x)))
    out = (*own[:axis], *(f"i{j}" for j in range(q)), *own[axis + 1:])
    return label_links(node, port, axes, ctx, {("in", 0): own, ("out", 0): out})


def _pick_links(node, port, axes, ctx, axis: int, index: int) -> Result:
    """Cells of the data slot at ``index`` on ``axis`` <-> the cells of the output slot (axis dropped)."""
    dims = ctx.dims(operand(node, port), axes)
    if dims is None:
        return Barrier("Gather: channel dimension not static")
    cells = np.arange(int(np.prod(dims)))
    coords = list(np.unravel_index(cells, dims))
    if port == ("in", 0):
        p = axes.index(axis)
        mask = coords[p] == index
        keep = [k for k in range(len(axes)) if k != p]
        tgt = tuple(a - (a > axis) for a in axes if a != axis)
        dst = np.ravel_multi_index([coords[k][mask] for k in keep], [dims[k] for k in keep])
        return [Link(node.outputs[0], tgt, cells[mask], dst)]
    mapped = [a + (a >= axis) for a in axes]
    pos = sum(a < axis for a in mapped) if mapped == sorted(mapped) else len(mapped)
    tgt = (*mapped[:pos], axis, *mapped[pos:])
    tdims = ctx.dims(node.inputs[0], tgt)
    if tdims is None:
        return Barrier("Gather: channel dimension not static")
    full = [*coords[:pos], np.full_like(cells, index), *coords[pos:]]
    return [Link(node.inputs[0], tgt, cells, np.ravel_multi_index(full, tdims))]
