"""In-graph reductions of tapped tensors, for observers that only need each batch's extremes.

For min/max and moving-average calibration the tap model does not output the tensors themselves: it
outputs, per tap, four scalars computed inside ONNX Runtime (where its memory planner reuses the buffers)::

    lo, hi = ReduceMin(x), ReduceMax(x)
    if -outlier_abs < lo and hi < outlier_abs:   min, max, outliers = lo, hi, 0
    else:  ok = Less(Abs(x), outlier_abs)                 # False for outliers and NaN
           min, max = ReduceMin(Where(ok, x, +inf)), ReduceMax(Where(ok, x, -inf))
           outliers = ReduceSum(Cast(Not(ok), int64))
    size = Size(x)

and, when a channel mean is asked for, ``ReduceSum`` over every axis but the channel axis. So a run returns
a few numbers per tensor instead of every activation, and peak memory is that of plain inference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import add_initializer


@dataclasses.dataclass
class ReduceBuilder:
    """Adds reduction nodes for tapped values to the main graph of a tap model."""

    graph: ir.Graph
    opset: int
    outlier_abs: float
    fresh: Callable[[str], str]  # a new unique name from a hint
    _consts: dict = dataclasses.field(default_factory=dict)
    _into: list | None = None  # nodes of the subgraph being built, else None
    _cursor: ir.Node | None = None  # main-graph node the next reduction node goes after

    def stats(self, x: ir.Value) -> list[ir.Value]:
        """``[min, max, outliers, size]`` of ``x`` with outliers left out of min and max. The masked
        reductions run only when the plain extremes reach ``outlier_abs`` (an ``If``), so the common case
        costs two reductions."""
        limit, pos_inf, neg_inf = self._limits(x.dtype)
        neg_limit = self._consts[(x.dtype, "neg")]
        producer = x.producer()
        self._cursor = producer if producer is not None and producer.graph is self.graph else None
        low = self._node("ReduceMin", [x], keepdims=0)
        high = self._node("ReduceMax", [x], keepdims=0)
        clean = self._node("And", [self._node("Greater", [low, neg_limit]), self._node("Less", [high, limit])])
        plain = self._branch("calib_plain", lambda: [
            self._node("Identity", [low]), self._node("Identity", [high]),
            self._node("Constant", [], value=ir.tensor(np.array(0, np.int64)))])
        masked = self._branch("calib_masked", lambda: self._masked(x, limit, pos_inf, neg_inf))
        node = ir.Node("", "If", [clean], attributes=[ir.AttrGraph("then_branch", plain),
                       ir.AttrGraph("else_branch", masked)], num_outputs=3, name=self._fresh("calib_if"))
        self._place(node)
        for out in node.outputs:
            out.name = self._fresh("calib_stat")
        return [*node.outputs, self._node("Size", [x])]

    def _masked(self, x, limit, pos_inf, neg_inf) -> list[ir.Value]:
        ok = self._node("Less", [self._node("Abs", [x]), limit])  # False for outliers and NaN
        low = self._node("ReduceMin", [self._node("Where", [ok, x, pos_inf])], keepdims=0)
        high = self._node("ReduceMax", [self._node("Where", [ok, x, neg_inf])], keepdims=0)
        bad = self._node("Cast", [self._node("Not", [ok])], to=ir.DataType.INT64)
        return [low, high, self._node("ReduceSum", [bad], keepdims=0)]

    def _branch(self, name: str, build) -> ir.Graph:
        """A subgraph holding the nodes ``build()`` makes, with the values it returns as outputs."""
        self._into = []
        try:
            outputs = build()
            nodes = self._into
        finally:
            self._into = None
        return ir.Graph([], outputs, nodes=nodes, name=self._fresh(name))

    def channel_sum(self, x: ir.Value, rank: int, axis: int) -> ir.Value:
        """Sums of ``x`` over every axis but ``axis`` (float, shape ``[C]``)."""
        axes = [a for a in range(rank) if a != axis]
        if self.opset >= 13:
            const = add_initializer(self.graph, np.array(axes, np.int64), self._fresh("calib_axes"))
            return self._node("ReduceSum", [x, const], keepdims=0)
        return self._node("ReduceSum", [x], keepdims=0, axes=axes)

    def _limits(self, dtype: ir.DataType):
        if dtype not in self._consts:
            np_dtype = dtype.numpy()
            with np.errstate(over="ignore"):  # float16 cannot hold 1e8: the limit becomes inf
                values = (np.array(self.outlier_abs, np_dtype), np.array(np.inf, np_dtype),
                          np.array(-np.inf, np_dtype), np.array(-self.outlier_abs, np_dtype))
            made = [add_initializer(self.graph, v, self._fresh(f"calib_{tag}"))
                    for v, tag in zip(values, ("limit", "pos_inf", "neg_inf", "neg_limit"))]
            self._consts[dtype] = tuple(made[:3])
            self._consts[(dtype, "neg")] = made[3]
        return self._consts[dtype]

    def _node(self, op: str, inputs, **attrs) -> ir.Value:
        node = ir.Node("", op, inputs, attributes=[_attr(k, v) for k, v in attrs.items()],
                       name=self._fresh("calib_reduce"))
        self._place(node)
        out = node.outputs[0]
        out.name = self._fresh(f"calib_{op.lower()}")
        return out

    def _place(self, node: ir.Node) -> None:
        """Into the subgraph being built, else right after the previous reduction node (the first one
        right after the tapped value's producer): ONNX Runtime then frees each activation as soon as
        the model no longer needs it, instead of keeping all of them for reductions at the end."""
        if self._into is not None:
            self._into.append(node)
            return
        if self._cursor is not None:
            self.graph.insert_after(self._cursor, node)
        elif len(self.graph):
            self.graph.insert_before(self.graph[0], node)
        else:
            self.graph.append(node)
        self._cursor = node

    def _fresh(self, hint: str) -> str:
        return self.fresh(hint)


def _attr(name: str, value):
    if isinstance(value, ir.Tensor):
        return ir.AttrTensor(name, value)
    if isinstance(value, ir.DataType):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, list):
        return ir.AttrInt64s(name, value)
    return ir.AttrInt64(name, int(value))
