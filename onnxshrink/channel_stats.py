"""Per-channel statistics of activations over a data set, reduced inside the graph.

``collect(model, data, taps)`` adds, for each ``ChannelTap``, a reduction over every axis but the tap's
channel axis to ``model`` (which it takes over: pass a clone), opens one ONNX Runtime session
(``ORT_ENABLE_BASIC``, priority-based order so each reduction runs right after its tensor), runs the
feeds one at a time and keeps only the running per-channel results. Memory does not grow with the
number of feeds, and no activation tensor leaves the session.

Kinds:

- ``absmax``: ``max |x|`` per channel (``ReduceMax(Abs(x))``), for SmoothQuant's activation scales;
- ``mean``: the mean per channel over all other axes and all feeds (``ReduceSum(x)`` plus ``Size(x)``),
  for bias correction. Feeds whose shapes differ (dynamic spatial size) are weighted by element count.
  With a ``weight`` tensor (same shape, e.g. a 0/1 mask), the weighted mean
  ``sum(x * w) / sum(w)`` per channel (``ReduceSum`` of both); a channel whose weights sum to 0 gets 0.

Each tapped value needs a known rank (shape inference); ``collect`` raises ``ConfigError`` otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxshrink import data as data_mod
from onnxshrink import model_io, runtime
from onnxshrink.errors import ConfigError, RuntimeFailure
from onnxshrink.graph_utils import NameGen

KINDS = ("absmax", "mean")


@dataclasses.dataclass(frozen=True)
class ChannelTap:
    """A value of the model to reduce per channel along ``axis`` (negative counts from the end)."""

    value: ir.Value
    axis: int
    kind: str = "absmax"
    weight: ir.Value | None = None  # ``mean`` only: per-element weights of the same shape

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"channel statistic {self.kind!r} is not one of {KINDS}")


class _Acc:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.value: np.ndarray | None = None
        self.count = 0.0

    def add(self, reduced: np.ndarray, size: np.ndarray | None) -> None:
        reduced = np.asarray(reduced, np.float64).reshape(-1)
        if self.value is not None and self.value.shape != reduced.shape:
            raise ConfigError(f"channel count changed between feeds ({self.value.shape} -> {reduced.shape})")
        if self.kind == "absmax":
            self.value = reduced if self.value is None else np.maximum(self.value, reduced)
            return
        self.value = reduced if self.value is None else self.value + reduced
        size = np.asarray(size, np.float64)
        self.count = self.count + (size.reshape(-1) if size.ndim else float(size) / max(reduced.size, 1))

    def result(self) -> np.ndarray | None:
        if self.value is None:
            return None
        if self.kind == "absmax":
            return self.value
        count = np.asarray(self.count, np.float64)
        return np.where(count > 0, self.value / np.maximum(count, 1e-300), 0.0)


def collect(model: ir.Model, data, taps: list[ChannelTap], *, providers=None, limit: int | None = None
            ) -> list[np.ndarray | None]:
    """Per-channel statistic of each tap over the feeds of ``data`` (at most ``limit`` of them).

    ``model`` is changed (reduction nodes and outputs are added): give a clone. Returns one float64
    array per tap (None for a tap whose tensor was empty in every feed).
    """
    if not taps:
        return []
    source = data_mod.feeds(data, model)
    outputs = _add_reductions(model, taps)
    so = runtime.session_options(level=runtime.ort().GraphOptimizationLevel.ORT_ENABLE_BASIC)
    so.execution_order = runtime.ort().ExecutionOrder.PRIORITY_BASED
    # no arena: it would keep the peak of the largest run for the session's life; bias correction's probe
    # dequantizes every weight in float (one-off, its probe of the 2.25 GiB model after 4 feeds: 3,122 ->
    # 2,313 MiB anonymous, peak 2,704, and faster); a handful of feeds pays nothing for the mallocs
    so.enable_cpu_mem_arena = False
    session = runtime.make_session(model, providers, options=so)
    accs = [_Acc(t.kind) for t in taps]
    for i, feed in enumerate(source):
        if limit is not None and i >= limit:
            break
        try:
            outs = session.run(outputs, feed)
        except Exception as e:
            raise RuntimeFailure(f"per-channel statistics: the model failed on feed {i}: {e}") from e
        j = 0
        for tap, acc in zip(taps, accs):
            size = outs[j + 1] if tap.kind == "mean" else None
            acc.add(outs[j], size)
            j += 2 if tap.kind == "mean" else 1
    return [a.result() for a in accs]


def _add_reductions(model: ir.Model, taps: list[ChannelTap]) -> list[str]:
    graph = model.graph
    names = NameGen(model)
    opset = model_io.default_opset(model) or 13
    outputs: list[str] = []
    for tap in taps:
        v = tap.value
        if v.shape is None:
            raise ConfigError(f"per-channel statistics: tensor {v.name!r} has no known rank (run shape inference)")
        rank = len(v.shape)
        axis = tap.axis % rank if rank else 0
        axes = [a for a in range(rank) if a != axis]
        src = v
        if tap.kind == "absmax":
            src = _append(graph, "Abs", [v], names(f"{v.name}_abs"))
        elif tap.weight is not None:
            src = _append(graph, "Mul", [v, tap.weight], names(f"{v.name}_weighted"))
        op = "ReduceMax" if tap.kind == "absmax" else "ReduceSum"
        outs = [_reduce(graph, op, src, axes, opset, names, f"{v.name}_{tap.kind}", v.dtype)]
        if tap.kind == "mean" and tap.weight is not None:
            outs.append(_reduce(graph, "ReduceSum", tap.weight, axes, opset, names, f"{v.name}_wsum", v.dtype))
        elif tap.kind == "mean":
            outs.append(_append(graph, "Size", [v], names(f"{v.name}_size")))
            outs[-1].dtype = ir.DataType.INT64
        for o in outs:
            graph.outputs.append(o)
            outputs.append(o.name)
    return outputs


def _reduce(graph: ir.Graph, op: str, src: ir.Value, axes: list[int], opset: int, names: NameGen, hint: str,
            dtype) -> ir.Value:
    name = names(hint)
    if opset >= (18 if op == "ReduceMax" else 13):  # axes became an input
        red = _append(graph, op, [src, _int_const(graph, axes, names(f"{hint}_axes"))], name, keepdims=0)
    else:
        red = _append(graph, op, [src], name, keepdims=0, axes=axes)
    red.dtype = dtype
    return red


def _append(graph: ir.Graph, op: str, inputs, name: str, **attrs) -> ir.Value:
    attributes = [ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, v) for k, v in attrs.items()]
    node = ir.Node("", op, inputs, attributes=attributes, name=name)
    node.outputs[0].name = name
    graph.append(node)
    return node.outputs[0]


def _int_const(graph: ir.Graph, values: list[int], name: str) -> ir.Value:
    tensor = ir.tensor(np.asarray(values, np.int64), name=name)
    node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", tensor)], name=name)
    node.outputs[0].name = name
    graph.append(node)
    return node.outputs[0]
