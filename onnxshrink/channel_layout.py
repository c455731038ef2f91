"""Channel rules of layout ops: Concat, Split and Slice (offsets), the reshape family (Reshape, Flatten,
Squeeze, Unsqueeze) and Shape.

Concat puts each input's channels at its offset in the output; Split and Slice take a window (sizes,
starts and ends are rewritten by the pass when channels go; a Slice step on a channel axis is a barrier).

A reshape is cut into segments: runs of input axes and runs of output axes with equal products (size-1
axes dropped), so a channel slot inside one input segment maps onto the whole output segment with the
same flat index: a conv channel becomes a block of flattened features (the flatten stride), a hidden
axis of size H*d becomes the head axes (H, d). A slot may span several segments only when it
covers each of them whole (the head axes (H, d) of q taken from a packed ``[3, H, d]`` by Slice
and Squeeze); one that mixes with other axes is a barrier.

A Reshape's target shape must be rewritable on every output axis that may shrink: a constant entry (an
initializer, a Constant, or a constant piece of a Concat of 1-element pieces, as exporters write the
head count), a -1, or a 0 that copies the same input axis. An entry computed at run time is a barrier
("head count computed at run time"), so a stale count can never survive pruning silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxshrink.channel_rules import Barrier, Link, Result, label_links, operand
from onnxshrink.graph_utils import attr_value, const_array


def segments(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of axes of shape ``a`` with runs of ``b`` of equal product (size-1 axes left out).
    Symbolic or unknown dims pair one to one with each other (a batch ``N`` with an inferred -1).
    None when the shapes do not line up."""
    ia = [i for i, d in enumerate(a) if d != 1]
    ib = [j for j, d in enumerate(b) if d != 1]
    segs, p, q = [], 0, 0
    while p < len(ia) and q < len(ib):
        da, db = a[ia[p]], b[ib[q]]
        if not isinstance(da, int) or not isinstance(db, int):
            if isinstance(da, int) or isinstance(db, int):
                return None
            segs.append(([ia[p]], [ib[q]]))
            p, q = p + 1, q + 1
            continue
        sa, sb, pa, pb = [ia[p]], [ib[q]], da, db
        p, q = p + 1, q + 1
        while pa != pb:
            if pa < pb:
                if p >= len(ia) or not isinstance(a[ia[p]], int):
                    return None
                pa *= a[ia[p]]
                sa.append(ia[p])
                p += 1
            else:
                if q >= len(ib) or not isinstance(b[ib[q]], int):
                    return None
                pb *= b[ib[q]]
                sb.append(ib[q])
                q += 1
        segs.append((sa, sb))
    if p != len(ia) or q != len(ib):
        return None
    return segs


def reshape(node: ir.Node, port, axes, ctx) -> Result:
    """Reshape/Flatten/Squeeze/Unsqueeze: a slot inside one segment maps to the other side's segment."""
    if port not in (("in", 0), ("out", 0)):
        return Barrier(f"{node.op_type}: a channel reaches its shape input")
    x, y = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if x is None or y is None:
        return Barrier(f"{node.op_type}: shapes unknown")
    segs = segments(tuple(x), tuple(y))
    if segs is None:
        return Barrier(f"{node.op_type}: input and output shapes do not line up")
    src_shape, side = (x, 0) if port == ("in", 0) else (y, 1)
    axes = tuple(axes)
    seg = _slot_segment(segs, side, [a for a in axes if src_shape[a] != 1])
    if seg is None:
        return Barrier(f"{node.op_type} mixes a channel slot with other axes")
    if node.op_type == "Reshape" and port == ("in", 0):
        why = next(filter(None, (_target_rewritable(node, s[1], s[0], ctx.shapes) for s in seg[2])), None)
        if why:
            return Barrier(why)
    own_axes, other_axes = seg[side], seg[1 - side]
    own_dims = [src_shape[a] for a in own_axes]
    flat = np.arange(int(np.prod(own_dims)))
    coords = np.unravel_index(flat, own_dims)
    slot_coords = [coords[own_axes.index(a)] for a in axes if a in own_axes]
    slot_dims = [src_shape[a] for a in axes if a in own_axes]
    src = np.ravel_multi_index(slot_coords, slot_dims)
    other = node.outputs[0] if side == 0 else node.inputs[0]
    if list(axes) == own_axes:
        return [Link(other, tuple(other_axes))]
    return [Link(other, tuple(other_axes), src, flat)]


def _slot_segment(segs, side: int, live: list[int]):
    """The segment holding the slot's live axes, as ``(in axes, out axes, [segments])``: one segment
    (the slot may cover part of it), or several that the slot covers whole (a head slot ``(H, d)``
    through a Squeeze of the packed q/k/v axis). None when the slot mixes with other axes."""
    touched = [s for s in segs if set(live) & set(s[side])]
    if not live or not touched:
        return None
    if len(touched) == 1:
        s = touched[0]
        return (s[0], s[1], touched) if set(live) <= set(s[side]) else None
    if any(not set(s[side]) <= set(live) for s in touched):
        return None
    return [a for s in touched for a in s[0]], [b for s in touched for b in s[1]], touched


# ---------------------------------------------------------------- offsets: concat, split, slice


def _axis(node, rank, default=0) -> int:
    a = int(attr_value(node, "axis", default))
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


def resolve_minus_one(x: tuple, y: tuple, entries) -> tuple:
    """The output shape with a -1 entry worked out when shape inference could not (a symbolic batch
    on both sides cancels out)."""
    if entries is None or len(entries) != len(y):
        return y
    minus = [i for i, d in enumerate(y) if not isinstance(d, int) and entries[i].value == -1]
    if len(minus) != 1:
        return y
    sym_in = sorted(str(d) for d in x if not isinstance(d, int))
    sym_out = sorted(str(d) for i, d in enumerate(y) if not isinstance(d, int) and i != minus[0])
    if sym_in != sym_out or "None" in sym_in:
        return y
    num = int(np.prod([d for d in x if isinstance(d, int)]))
    den = int(np.prod([d for i, d in enumerate(y) if isinstance(d, int)]))
    if den == 0 or num % den:
        return y
    out = list(y)
    out[minus[0]] = num // den
    return tuple(out)


# ---------------------------------------------------------------- the target shape of a Reshape


@dataclasses.dataclass
class Entry:
    """One entry of a Reshape target: its constant value (None if computed at run time) and where it
    lives (the constant value holding it and the index inside)."""

    value: int | None
    holder: ir.Value | None = None
    index: int = 0


def shape_entries(node: ir.Node, shapes: dict | None = None) -> list[Entry] | None:
    """The entries of a Reshape's target shape, traced through a Concat of 1-element pieces
    (``shapes``: inferred shapes by value, for the lengths of computed pieces)."""
    shape = node.inputs[1] if len(node.inputs) > 1 else None
    if shape is None:
        return None
    arr = const_array(shape)
    if arr is not None:
        return [Entry(int(v), shape, i) for i, v in enumerate(arr.reshape(-1))]
    prod = shape.producer()
    if prod is None or prod.op_type != "Concat":
        return None
    entries: list[Entry] = []
    for piece in prod.inputs:
        parr = const_array(piece)
        if parr is not None:
            entries.extend(Entry(int(v), piece, i) for i, v in enumerate(parr.reshape(-1)))
            continue
        n = _static_len(piece, shapes or {})
        if n is None:
            return None
        entries.extend(Entry(None) for _ in range(n))
    return entries


def _static_len(v: ir.Value, shapes: dict) -> int | None:
    shape = shapes.get(v)
    if shape is None and v.shape is not None:
        shape = tuple(v.shape)
    if shape is not None and len(shape) == 1 and isinstance(shape[0], int):
        return shape[0]
    return None


def _target_rewritable(node: ir.Node, out_axes, in_axes, shapes) -> str | None:
    entries = shape_entries(node, shapes)
    if entries is None:
        return "Reshape target shape computed at run time (head count cannot be rewritten)"
    shape = node.inputs[1]
    prod = shape.producer()
    others = [u for u in shape.uses() if u.node is not node]
    if prod is not None and any(u.node.op_type != "Reshape" or u.idx != 1 for u in others):
        return "Reshape target shape is also used by another op"
    for a in out_axes:
        if a >= len(entries):
            return "Reshape target shape has an unexpected length"
        e = entries[a]
        if e.value is None:
            return "Reshape target entry for a channel axis is computed at run time (head count)"
        if e.value == 0 and list(in_axes) != [a]:
            return "Reshape target copies (0) a dim that moves"
    return None


# ---------------------------------------------------------------- Shape


def shape_op(node: ir.Node, port, axes, ctx) -> Result:
    """Shape: fine as long as no reader looks at the entries of the channel axes."""
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        return Barrier("Shape of a value with unknown rank")
    r = len(shape)
    start = int(attr_value(node, "start", 0))
    end = attr_value(node, "end", None)
    start = start + r if start < 0 else start
    end = r if end is None else (int(end) + r if int(end) < 0 else min(int(end), r))
    read = _positions_read(node.outputs[0], end - start)
    if read is None or any((a - start) in read for a in axes):
        return Barrier("Shape: the channel dimension is read at run time")
    return []


def _positions_read(value: ir.Value, n: int) -> set[int] | None:
    """Positions of a shape vector its readers look at (Gather/Slice with constant indices)."""
    if value.is_graph_output():
        return None
    read: set[int] = set()
    for use in value.uses():
        user = use.node
        if user.op_type == "Gather" and use.idx == 0 and int(attr_value(user, "axis", 0)) == 0:
            idx = const_array(user.inputs[1])
            if idx is None:
                return None
            read.update(int(i) % n for i in idx.reshape(-1))
        elif user.op_type == "Slice" and use.idx == 0:
            spec = slice_spec(user, (n,))
            if isinstance(spec, Barrier) or set(spec) - {0}:
                return None
            s, e, st = spec.get(0, (0, n, 1))
            read.update(range(s, e, st) if st > 0 else range(n))
        else:
            return None
    return read
