"""Reductions that return their input (rules of ``eliminate_identities``).

``ReduceMean``/``ReduceSum``/``ReduceMax``/``ReduceMin``/``ReduceProd`` of one element is that element,
exactly. So a reduction over axes whose dims are all statically 1 is x when it keeps its dims, and
``Unsqueeze(Reduce(x, axes, keepdims=0), axes)`` is x. With no axes and ``noop_with_empty_axes=1``
the reduction is a no-op. Other reductions (L1, L2, LogSumExp, SumSquare) change a single element
and are never touched. Axes come from the attribute (older opsets) or a constant input 1.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxshrink.passes import _value_facts as vf

from onnxshrink.graph_utils import is_default_domain

EXACT = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"})


def _axes(node: ir.Node, rank: int) -> list[int] | None:
    """The reduced axes in [0, rank), or None when unknown; [] for a no-op."""
    given = "axes" in node.attributes or (len(node.inputs) > 1 and node.inputs[1] is not None)
    axes = vf.axes(node) if given else []
    if axes is None:
        return None
    if not axes:
        return [] if node.attributes.get_int("noop_with_empty_axes", 0) else list(range(rank))
    if any(not -rank <= a < rank for a in axes):
        return None
    return sorted({a % rank for a in axes})


def _ones_at(x: ir.Value | None, node: ir.Node) -> list[int] | None:
    """The axes ``node`` reduces when each of them has static dim 1 in ``x``, else None."""
    dims = vf.dims(x)
    if dims is None:
        return None
    axes = _axes(node, len(dims))
    if axes is None or any(dims[a] != 1 for a in axes):
        return None
    return axes


def kept_reduce_source(node: ir.Node) -> ir.Value | None:
    """x when ``node`` is a keepdims reduction over size-1 axes of x (or a no-op)."""
    if node.op_type not in EXACT or not node.inputs or node.attributes.get_int("keepdims", 1) == 0:
        return None
    x = node.inputs[0]
    return x if _ones_at(x, node) is not None else None


def unsqueezed_reduce(unsqueeze: ir.Node) -> tuple[ir.Value, ir.Node] | None:
    """(x, the reduction) when ``unsqueeze`` restores the size-1 axes a keepdims=0 reduction of x
    dropped (the reduction's output read only here)."""
    y = unsqueeze.inputs[0] if unsqueeze.inputs else None
    reduce = None if y is None else y.producer()
    if reduce is None or reduce.op_type not in EXACT or not is_default_domain(reduce):
        return None
    if reduce.attributes.get_int("keepdims", 1) != 0 or y.is_graph_output() or len(y.uses()) != 1:
        return None
    x = reduce.inputs[0]
    axes = _ones_at(x, reduce)
    if not axes:
        return None
    rank = len(x.shape)
    restored = vf.axes(unsqueeze)
    if restored is None or any(not -rank <= a < rank for a in restored):
        return None
    return (x, reduce) if sorted({a % rank for a in restored}) == axes else None
