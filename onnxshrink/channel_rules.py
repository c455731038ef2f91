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
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import const_array

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


Result = list[Link] | Barrier
RuleFn = Callable[[ir.Node, Port, tuple, Ctx], Result]


def operand(node: ir.Node, port: Port) -> ir.Value | None:
    kind, i = port
    seq = node.inputs if kind == "in" else node.outputs
    return seq[i] if i < len(seq) else None


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


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
    perm = _attr(node, "perm") or list(reversed(range(len(shape))))
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
    axis = _attr(node, "axis", -1)
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
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        if arr is None:
            return Barrier("Reduce axes computed at run time")
        axes = [int(a) for a in arr.reshape(-1)]
    if not axes:
        axes = [] if _attr(node, "noop_with_empty_axes", 0) else list(range(r))
    axes = {a + r if a < 0 else a for a in axes}
    own = tuple(f"r{i}" for i in range(r))
    keepdims = _attr(node, "keepdims", 1)
    out = tuple((f"k{i}" if i in axes else own[i]) for i in range(r) if keepdims or i not in axes)
    return {("in", 0): own, ("out", 0): out}, tuple(own[i] for i in axes)


def constant(node, port, axes, ctx) -> Result:
    """Constant nodes: a source of values, nothing to couple."""
    return []


# ---------------------------------------------------------------- weight ops


def conv(node: ir.Node, port: Port, axes, ctx: Ctx) -> Result:
    """Conv: out channels = weight rows = bias; in channels = weight columns (group 1). Grouped convs:
    depthwise-like ones (one in or out channel per group) tie input group k to output group k and prune
    whole groups; others prune the same positions in every group (group count kept)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or const_array(w) is None:
        return Barrier("Conv weight is not a constant")
    if len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is None:
        return Barrier("Conv bias is not a constant")
    x, y = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    wshape = ctx.shape(w)
    if x is None or y is None or wshape is None or not isinstance(x[1], int):
        return Barrier("Conv shapes unknown")
    g = int(_attr(node, "group", 1))
    sp = len(x) - 2
    labels = {
        ("in", 0): ("n", "ci" if g == 1 else "gi", *(f"x{i}" for i in range(sp))),
        ("in", 1): ("co", "ci" if g == 1 else "wi", *(f"k{i}" for i in range(sp))),
        ("in", 2): ("co",),
        ("out", 0): ("n", "co", *(f"y{i}" for i in range(sp))),
    }
    if node.op_type == "ConvTranspose":
        labels[("in", 1)] = ("ci" if g == 1 else "gi", "co" if g == 1 else "wo",
                             *(f"k{i}" for i in range(sp)))
        if g != 1 and not _depthwise(wshape[0] // g, wshape[1]):
            return Barrier("grouped ConvTranspose (only depthwise-like ones are handled)")
    links = label_links(node, port, axes, ctx, labels)
    if g == 1 or isinstance(links, Barrier):
        return links
    extra = _group_links(node, port, axes, ctx, g, x[1], y[1], wshape)
    return extra if isinstance(extra, Barrier) else links + extra


def _depthwise(per_in: int, per_out: int) -> bool:
    return per_in == 1 or per_out == 1


def _group_links(node, port, axes, ctx, g, cin, cout, wshape) -> Result:
    """Extra links of a grouped conv. Whole-group mode: input group k goes with output group k.
    Within mode: input channels with the same position in their group go together (one weight
    column), and so do output channels (the group count stays)."""
    a, b = cin // g, cout // g
    role = _group_role(node, port, axes)
    if role is None:
        return []
    if role == "other":
        return Barrier("grouped Conv: only the channel axis can be pruned")
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    within = not _depthwise(a, b) and ctx.grouped != "groups" and node.op_type == "Conv"
    i, o = np.arange(cin), np.arange(cout)
    if not within:
        src_in = np.repeat(i, b)
        dst_out = np.repeat(i // a, b) * b + np.tile(np.arange(b), cin)
        if role == "x":
            return [Link(y, (1,), src_in, dst_out)]
        if role == "y":
            return [Link(x, (1,), dst_out, src_in)]
        if role == "w_in" and a > 1:
            return Barrier("grouped Conv: weight columns of a whole-group conv are not prunable")
        return []
    if role == "x":
        return [Link(w, (1,), i, i % a)]
    if role == "w_in":
        return [Link(x, (1,), i % a, i)]
    if role == "y":
        return [Link(y, (1,), o, o % b)]
    return [Link(w, (0,), o, o % b)]  # w_out


def _group_role(node, port, axes) -> str | None:
    """Which part of a grouped conv a slot is: x, y, w_in, w_out, None (bias) or other."""
    kind, i = port
    if (kind, i) == ("in", 2):
        return None
    want = {("out", 0): "y", ("in", 0): "x"}.get((kind, i))
    if want is not None:
        return want if tuple(axes) == (1,) else "other"
    if tuple(axes) not in ((0,), (1,)):
        return "other"
    first = "w_in" if node.op_type == "ConvTranspose" else "w_out"
    second = "w_out" if node.op_type == "ConvTranspose" else "w_in"
    return first if axes == (0,) else second


def gemm(node, port, axes, ctx) -> Result:
    """Gemm: Y columns = B's output axis = C; A's inner axis = B's inner axis (contracted)."""
    b = node.inputs[1]
    ta, tb = _attr(node, "transA", 0), _attr(node, "transB", 0)
    out = ctx.shape(node.outputs[0])
    if out is None:
        return Barrier("Gemm shapes unknown")
    labels = {
        ("in", 0): ("k", "m") if ta else ("m", "k"),
        ("in", 1): ("n", "k") if tb else ("k", "n"),
        ("out", 0): ("m", "n"),
    }
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        cshape = ctx.shape(node.inputs[2])
        if cshape is None:
            return Barrier("Gemm C shape unknown")
        labels[("in", 2)] = tuple(
            lab if lab.startswith("bc") else "mn"[int(lab[1:])]
            for lab in _broadcast_labels(cshape, out, "e", "c")
        )
    if b is None or ctx.shape(b) is None:
        return Barrier("Gemm shapes unknown")
    return label_links(node, port, axes, ctx, labels)


def matmul(node, port, axes, ctx) -> Result:
    """MatMul: batch axes broadcast, A's last axis = B's second-to-last (contracted), Y's last = B's."""
    sa, sb, out = (ctx.shape(v) for v in (node.inputs[0], node.inputs[1], node.outputs[0]))
    if sa is None or sb is None or out is None:
        return Barrier("MatMul shapes unknown")
    ra, rb, ro = len(sa), len(sb), len(out)
    la = ("k",) if ra == 1 else (*_batch(sa[:-2], out, ro - (ra > 1) - (rb > 1), "a"), "m", "k")
    lb = ("k",) if rb == 1 else (*_batch(sb[:-2], out, ro - (ra > 1) - (rb > 1), "b"), "k", "n")
    nb = ro - (ra > 1) - (rb > 1)
    lo = (*(f"e{i}" for i in range(nb)), *(("m",) if ra > 1 else ()), *(("n",) if rb > 1 else ()))
    return label_links(node, port, axes, ctx, {("in", 0): la, ("in", 1): lb, ("out", 0): lo})


def _batch(shape, out, nbatch, tag) -> tuple:
    return _broadcast_labels(shape, tuple(out[:nbatch]), "e", tag)


# ---------------------------------------------------------------- offsets: concat, split, slice


def _axis(node, rank, default=0) -> int:
    a = int(_attr(node, "axis", default))
    return a + rank if a < 0 else a


def _segment_links(node, port, axes, ctx, whole: tuple, parts: Sequence[tuple], axis: int) -> Result:
    """Concat-like maps: ``whole`` = (port, value); ``parts`` = [(port, value, offset, length)]."""
    value = operand(node, port)
    dims = ctx.dims(value, axes)
    if dims is None:
        return Barrier(f"{node.op_type}: channel dimension not static")
    if axis not in axes:
        labels = {p: tuple(f"a{i}" for i in range(len(ctx.shape(v)))) for p, v, *_ in parts}
        labels[whole[0]] = tuple(f"a{i}" for i in range(len(ctx.shape(whole[1]))))
        return label_links(node, port, axes, ctx, labels)
    p = list(axes).index(axis)
    cells = np.arange(int(np.prod(dims)))
    coords = list(np.unravel_index(cells, dims))
    links = []
    if port == whole[0]:
        for _, v, off, length in parts:
            mask = (coords[p] >= off) & (coords[p] < off + length)
            if not mask.any() or v is None:
                continue
            sub = [c[mask] for c in coords]
            sub[p] = sub[p] - off
            tdims = list(dims)
            tdims[p] = length
            links.append(Link(v, tuple(axes), cells[mask], np.ravel_multi_index(sub, tdims)))
        return links
    for q, v, off, length in parts:
        if q == port:
            shifted = list(coords)
            shifted[p] = shifted[p] + off
            tdims = list(ctx.dims(whole[1], axes))
            links.append(Link(whole[1], tuple(axes), cells, np.ravel_multi_index(shifted, tdims)))
    return links


def concat(node, port, axes, ctx) -> Result:
    """Concat: each input's channels sit at its offset in the output."""
    out = ctx.shape(node.outputs[0])
    if out is None:
        return Barrier("Concat shapes unknown")
    axis = _axis(node, len(out))
    parts, off = [], 0
    for i, v in enumerate(node.inputs):
        d = ctx.shape(v)
        if d is None or not isinstance(d[axis], int):
            return Barrier("Concat input sizes unknown")
        parts.append((("in", i), v, off, d[axis]))
        off += d[axis]
    return _segment_links(node, port, axes, ctx, (("out", 0), node.outputs[0]), parts, axis)


def split(node, port, axes, ctx) -> Result:
    """Split: each output takes its range of the input's channels (sizes rewritten when pruned)."""
    x = ctx.shape(node.inputs[0])
    if x is None:
        return Barrier("Split shapes unknown")
    axis = _axis(node, len(x))
    if len(node.inputs) > 1 and node.inputs[1] is not None and const_array(node.inputs[1]) is None:
        return Barrier("Split sizes computed at run time")
    parts, off = [], 0
    for j, v in enumerate(node.outputs):
        d = ctx.shape(v)
        if d is None or not isinstance(d[axis], int):
            return Barrier("Split output sizes unknown")
        parts.append((("out", j), v, off, d[axis]))
        off += d[axis]
    return _segment_links(node, port, axes, ctx, (("in", 0), node.inputs[0]), parts, axis)


def slice_(node, port, axes, ctx) -> Result:
    """Slice with constant starts/ends/axes and step 1 on channel axes: a window of the channels."""
    x = ctx.shape(node.inputs[0])
    if x is None or port not in (("in", 0), ("out", 0)):
        return Barrier("Slice: shapes unknown or a channel reaches its starts/ends")
    spec = slice_spec(node, x)
    if isinstance(spec, Barrier):
        return spec
    sliced = {a: se for a, se in spec.items() if a in axes}
    if not sliced:
        own = tuple(f"a{i}" for i in range(len(x)))
        return label_links(node, port, axes, ctx, {("in", 0): own, ("out", 0): own})
    (axis, (start, end, step)), *rest = sliced.items()
    if rest or step != 1:
        return Barrier("Slice over several channel axes or with a step")
    return _segment_links(node, port, axes, ctx, (("in", 0), node.inputs[0]),
                          [(("out", 0), node.outputs[0], start, end - start)], axis)


def slice_spec(node, shape) -> dict | Barrier:
    """axis -> (start, end, step) normalized to the input shape, from constant inputs."""
    arrays = []
    for i in range(1, 5):
        v = node.inputs[i] if i < len(node.inputs) else None
        arr = None if v is None else const_array(v)
        if v is not None and arr is None:
            return Barrier("Slice starts/ends/axes/steps computed at run time")
        arrays.append(None if arr is None else [int(a) for a in arr.reshape(-1)])
    starts, ends, ax, steps = arrays
    if starts is None or ends is None:
        return Barrier("Slice without constant starts/ends")
    r = len(shape)
    ax = ax or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    spec = {}
    for s, e, a, st in zip(starts, ends, ax, steps):
        a = a + r if a < 0 else a
        dim = shape[a]
        if not isinstance(dim, int):
            spec[a] = (s, e, st)
            continue
        s, e = (s + dim if s < 0 else s), (e + dim if e < 0 else e)
        spec[a] = (max(0, min(s, dim)), max(0, min(e, dim)), st)
    return spec
