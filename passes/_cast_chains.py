"""Cast chains of ``eliminate_identities``: a pair of Casts that returns its input, or collapses into one.

For ``Cast(to=C)`` reading, through ops that only move elements (``MOVERS``), the output of
``Cast(x, to=B)`` where x has dtype A:

- a round trip (C = A) is exact when every value of A is a value of B (``holds_all``: int32 -> int64 ->
  int32, float -> double -> float, uint8 -> float -> uint8), or when the values x can take are proven
  to fit B (a constant, ``Shape``/``Size`` of static dims, ``ArgMax``/``ArgMin`` over a static axis):
  the movers then run on x's type and both Casts go [casts_merged];
- directly adjacent Casts (no movers) with B holding every value of A collapse into ``Cast(x, to=C)``
  when converting the same value to C from A or from B gives the same result: A bool or an integer
  type (integer conversions wrap, int-to-float conversions round the same value), or A and C both
  floating point (one rounding of the same value) [casts_merged].

Refused: an intermediate value with another user or that is a graph output, A unknown (from the value,
its producer or shape inference), a narrowing round trip over values not proven to fit (e.g. ``Shape``
of a tensor with a symbolic dim: a dim of 2**31 or more would wrap in int32).
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir
from onnxshrink.passes import _value_facts as vf

from onnxshrink.graph_utils import const_array, is_default_domain

#: Ops that select or move elements of input 0 without changing their values; they take every type.
MOVERS = frozenset({"Slice", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Transpose", "Identity",
                    "Expand", "Tile"})
_MAX_MOVERS = 16


@dataclasses.dataclass
class CastPlan:
    """``outer`` reads ``inner``'s output through ``movers`` (first to last); ``x`` is ``inner``'s input."""

    inner: ir.Node
    movers: list[ir.Node]
    x: ir.Value
    source: ir.DataType  # A
    target: ir.DataType  # C


def plan(outer: ir.Node) -> CastPlan | None:
    """The chain ending at Cast ``outer``, when one of the rules applies; else None."""
    to = outer.attributes.get_int("to")
    if to is None or not outer.inputs or outer.inputs[0] is None:
        return None
    movers: list[ir.Node] = []
    value = outer.inputs[0]
    user = outer
    while True:
        node = value.producer()
        if node is None or not is_default_domain(node) or node.graph is not outer.graph:
            return None
        shared = value.is_graph_output() or [(u.node, u.idx) for u in value.uses()] != [(user, 0)]
        if shared and (node.op_type != "Cast" or movers):  # a used inner Cast may stay for its users
            return None
        if node.op_type == "Cast":
            break
        if node.op_type not in MOVERS or len(movers) >= _MAX_MOVERS or value is not node.outputs[0]:
            return None
        movers.insert(0, node)
        user, value = node, node.inputs[0] if node.inputs else None
        if value is None:
            return None
    x = node.inputs[0] if node.inputs else None
    source, mid = vf.known_dtype(x), node.attributes.get_int("to")
    if x is None or source is None or mid is None:
        return None
    result = CastPlan(node, movers, x, source, ir.DataType(to))
    return result if _exact(result, ir.DataType(mid)) else None


def _exact(p: CastPlan, mid: ir.DataType) -> bool:
    if p.target == p.source:
        return vf.holds_all(p.source, mid) or _values_fit(p.x, mid)
    if p.movers or not vf.holds_all(p.source, mid):
        return False
    if vf.is_int_like(p.source):
        return vf.is_int_like(p.target) or vf.is_float(p.target)
    return vf.is_float(p.source) and vf.is_float(p.target)


def _values_fit(x: ir.Value, dtype: ir.DataType) -> bool:
    """Whether every value ``x`` can take is provably a value of integer type ``dtype``."""
    arr = const_array(x)
    if arr is not None:
        return vf.fits(arr, dtype)
    node = x.producer()
    if node is None or not is_default_domain(node) or not node.inputs or node.inputs[0] is None:
        return False
    shape = node.inputs[0].shape
    if shape is None:
        return False
    dims = list(shape)
    hi: int | None = None
    if node.op_type == "Shape":
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(dims))
        picked = dims[slice(start, end)]
        if all(isinstance(d, int) for d in picked):
            hi = max(picked, default=0)
    elif node.op_type == "Size" and all(isinstance(d, int) for d in dims):
        hi = math.prod(dims)
    elif node.op_type in ("ArgMax", "ArgMin"):
        axis = node.attributes.get_int("axis", 0)
        d = dims[axis] if -len(dims) <= axis < len(dims) else None
        hi = d - 1 if isinstance(d, int) else None
    return hi is not None and vf.fits_range(0, max(hi, 0), dtype)
