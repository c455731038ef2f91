"""Shape vectors as values, for ``fold_constants``: what Shape/Gather/Concat/... chains compute.

A :class:`ShapeValue` is a small integer scalar or vector whose elements are ints or :class:`Dim`
(axis ``axis`` of value ``value``, not known statically). Rules, one per op (default domain only):
Shape (with ``start``/``end``), Size (static shapes only), Gather (axis 0, constant indices), Concat
(axis 0), Slice (axis 0, constant starts/ends/steps), Unsqueeze/Squeeze (scalar <-> one-element
vector), Cast (to int32/int64) and Identity. Any other op, or an input that is neither a shape value
nor a small integer constant, gives None. A fully static result is folded to a constant by the pass.

Two unknown dims are the same when they are the same axis of the same ``ir.Value`` object, or (with
``trust_dim_params``) when both carry the same ``dim_param`` name: by the ONNX convention a dimension
variable names one size throughout the model, and onnx shape inference gives two dims one name only
when it proved them equal (fresh ``unk__`` names otherwise).

``shape_inputs`` lists the values whose shapes these rules read, for ``_shape_info.fill_missing``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import const_array, is_default_domain

logger = logging.getLogger(__name__)

#: Integer constants up to this many elements take part in shape arithmetic.
MAX_ELEMENTS = 64
_INT_TYPES = {ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32}


@dataclasses.dataclass(frozen=True, eq=False)
class Dim:
    """Axis ``axis`` of ``value``, whose size is not known statically."""

    value: ir.Value
    axis: int
    param: str | None = None  # the dim_param name the dim had, if any

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dim) and other.value is self.value and other.axis == self.axis

    def __hash__(self) -> int:
        return hash((id(self.value), self.axis))


@dataclasses.dataclass(frozen=True)
class ShapeValue:
    elems: tuple  # of int | Dim
    scalar: bool = False
    dtype: ir.DataType = ir.DataType.INT64

    @property
    def static(self) -> bool:
        return all(isinstance(e, int) for e in self.elems)

    def array(self) -> np.ndarray:
        arr = np.array(self.elems, dtype=_INT_TYPES[self.dtype])
        return arr.reshape(()) if self.scalar else arr


Lookup = Callable[[ir.Value], "ShapeValue | None"]


def from_constant(value: ir.Value | None) -> ShapeValue | None:
    """A small int32/int64 scalar or vector constant as a shape value."""
    arr = const_array(value)
    if arr is None or arr.ndim > 1 or arr.size > MAX_ELEMENTS:
        return None
    dtype = {np.dtype(np.int64): ir.DataType.INT64, np.dtype(np.int32): ir.DataType.INT32}.get(arr.dtype)
    if dtype is None:
        return None
    return ShapeValue(tuple(int(x) for x in arr.reshape(-1)), arr.ndim == 0, dtype)


def shape_elems(value: ir.Value | None) -> tuple | None:
    """The dims of ``value``'s shape as ints and :class:`Dim`, or None when the rank is unknown."""
    if value is None or value.shape is None:
        return None
    return tuple(
        d if isinstance(d, int) else Dim(value, i, getattr(d, "value", None) or None)
        for i, d in enumerate(value.shape)
    )


def infer(node: ir.Node, lookup: Lookup) -> ShapeValue | None:
    """The shape value ``node`` computes, or None when it is not a supported shape computation."""
    if not is_default_domain(node) or len(node.outputs) != 1:
        return None
    rule = _RULES.get(node.op_type)
    if rule is None:
        return None
    try:
        return rule(node, lookup)
    except (IndexError, ValueError, TypeError, KeyError):
        return None  # malformed attributes or indices: not ours to judge


def _int_list(node: ir.Node, index: int, attr: str, lookup: Lookup) -> list[int] | None:
    """An int list given as input ``index`` (newer opsets) or attribute ``attr`` (older ones)."""
    if index < len(node.inputs) and node.inputs[index] is not None:
        sv = lookup(node.inputs[index])
        return list(sv.elems) if sv is not None and sv.static else None
    if attr in node.attributes:
        return list(node.attributes[attr].as_ints())
    return None


def _shape(node, lookup):
    elems = shape_elems(node.inputs[0])
    if elems is None:
        return None
    rank = len(elems)
    start = node.attributes["start"].as_int() if "start" in node.attributes else 0
    end = node.attributes["end"].as_int() if "end" in node.attributes else rank
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return ShapeValue(elems[start:end])


def _size(node, lookup):
    elems = shape_elems(node.inputs[0])
    if elems is None or not all(isinstance(e, int) for e in elems):
        return None
    return ShapeValue((math.prod(elems),), scalar=True)


def _vector(node, lookup, i=0) -> ShapeValue | None:
    sv = lookup(node.inputs[i]) if node.inputs[i] is not None else None
    return sv if sv is not None and not sv.scalar else None


def _gather(node, lookup):
    data, idx = _vector(node, lookup), lookup(node.inputs[1])
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
    if data is None or idx is None or not idx.static or axis not in (0, -1):
        return None
    n = len(data.elems)
    picked = []
    for i in idx.elems:
        if not -n <= i < n:
            return None
        picked.append(data.elems[i])
    return ShapeValue(tuple(picked), idx.scalar, data.dtype)


def _concat(node, lookup):
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else None
    parts = [_vector(node, lookup, i) for i in range(len(node.inputs))]
    if axis not in (0, -1) or any(p is None for p in parts) or not parts:
        return None
    if len({p.dtype for p in parts}) != 1:
        return None
    return ShapeValue(tuple(e for p in parts for e in p.elems), dtype=parts[0].dtype)


def _slice(node, lookup):
    data = _vector(node, lookup)
    starts = _int_list(node, 1, "starts", lookup)
    ends = _int_list(node, 2, "ends", lookup)
    axes = _int_list(node, 3, "axes", lookup) or [0]
    steps = _int_list(node, 4, "steps", lookup) or [1]
    if data is None or starts is None or ends is None or axes not in ([0], [-1]):
        return None
    if len(starts) != 1 or len(ends) != 1 or len(steps) != 1 or steps[0] == 0:
        return None
    return ShapeValue(_slice_elems(data.elems, starts[0], ends[0], steps[0]), dtype=data.dtype)


def _slice_elems(elems: tuple, start: int, end: int, step: int) -> tuple:
    """ONNX Slice on one axis (clamping as the spec says, not as Python does for negative steps)."""
    n = len(elems)
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, -1), n - 1), min(max(end, -1), n - 1)
    return tuple(elems[i] for i in range(start, end, step))


def _unsqueeze(node, lookup):
    sv = lookup(node.inputs[0])
    axes = _int_list(node, 1, "axes", lookup)
    if sv is None or not sv.scalar or axes not in ([0], [-1]):
        return None
    return ShapeValue(sv.elems, False, sv.dtype)


def _squeeze(node, lookup):
    sv = _vector(node, lookup)
    axes = _int_list(node, 1, "axes", lookup)
    if sv is None or len(sv.elems) != 1 or axes not in (None, [0], [-1]):
        return None
    return ShapeValue(sv.elems, True, sv.dtype)


def _cast(node, lookup):
    sv = lookup(node.inputs[0])
    to = ir.DataType(node.attributes["to"].as_int())
    if sv is None or to not in _INT_TYPES:
        return None
    if to == ir.DataType.INT32 and any(isinstance(e, int) and abs(e) >= 2**31 for e in sv.elems):
        return None
    return ShapeValue(sv.elems, sv.scalar, to)


def _identity(node, lookup):
    return lookup(node.inputs[0])


_RULES = {
    "Shape": _shape,
    "Size": _size,
    "Gather": _gather,
    "Concat": _concat,
    "Slice": _slice,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Cast": _cast,
    "Identity": _identity,
}


def same_dim(dim: Dim, value: ir.Value, axis: int, trust_dim_params: bool) -> bool:
    """Whether ``dim`` is axis ``axis`` of ``value`` (see the module docstring)."""
    if dim.value is value and dim.axis == axis:
        return True
    if not trust_dim_params or dim.param is None or value.shape is None or axis >= len(value.shape):
        return False
    other = value.shape[axis]
    return not isinstance(other, int) and getattr(other, "value", None) == dim.param


def reshape_target(node: ir.Node, lookup: Lookup, trust_dim_params: bool = True) -> np.ndarray | None:
    """A constant shape for ``Reshape(data, shape)`` whose shape value is only partly static.

    Each element must be an int or the dim of ``data`` at the same position, which becomes 0
    ("copy this dim"); needs ``allowzero=0``. None when that does not hold.
    """
    if node.op_type != "Reshape" or not is_default_domain(node) or len(node.inputs) < 2:
        return None
    if "allowzero" in node.attributes and node.attributes["allowzero"].as_int() != 0:
        return None
    data, sv = node.inputs[0], lookup(node.inputs[1]) if node.inputs[1] is not None else None
    if data is None or sv is None or sv.scalar or sv.static:
        return None
    target = []
    for i, e in enumerate(sv.elems):
        if isinstance(e, int):
            target.append(e)
        elif same_dim(e, data, i, trust_dim_params):
            target.append(0)
        else:
            return None
    return np.array(target, dtype=np.int64)


def shape_inputs(model: ir.Model) -> list[ir.Value]:
    """The data inputs of the Shape/Size/Reshape nodes of the main graph and its subgraphs: the values
    whose shapes the rules read."""
    return [
        node.inputs[0]
        for node in model.graph.all_nodes()
        if node.op_type in ("Shape", "Size", "Reshape") and is_default_domain(node) and node.inputs
        and node.inputs[0] is not None
    ]
