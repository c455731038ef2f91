"""Channel rules of the weight ops: Conv, ConvTranspose (grouped and depthwise too), Gemm, MatMul.

Output channels are weight rows (columns for MatMul and untransposed Gemm) and bias entries; input
channels are the weight's inner axis, contracted away. Grouped convs: see :func:`conv`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.channel_rules import (
    Barrier,
    Ctx,
    Link,
    Port,
    Result,
    _broadcast_labels,
    label_links,
)
from onnxshrink.graph_utils import const_array, int_attr


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
    g = int_attr(node, "group", 1)
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
    ta, tb = int_attr(node, "transA", 0), int_attr(node, "transB", 0)
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
