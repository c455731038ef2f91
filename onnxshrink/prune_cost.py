"""Estimated latency and MACs of a model as functions of its pruning groups' kept widths.

Every weight layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight) has an output-channel
and an input-channel axis on its weight; each axis's cells belong to pruning groups (a Concat
consumer's input spans several) or are fixed (blocked, protected or too-narrow groups, graph inputs).
Keeping ``k`` of a group's ``n`` atoms keeps ``k / n`` of that group's cells on every axis it touches,
so a layer's widths and MACs follow from the kept atoms of the live groups (MACs scale with the kept
fraction of both weight axes; a depthwise conv's input width is its output width).

Latency of a layer: ``node_us + MACs / throughput(kind, in width, out width, spatial size)`` with the
throughput from a :class:`~onnxshrink.kernel_table.KernelTable`; on ONNX Runtime's NCHWc kinds the
output width is padded up to whole blocks and input widths that are not whole blocks (beyond the
first) run at :data:`~onnxshrink.kernel_table.OFF_BLOCK` of the throughput. The model's latency adds
``run_us``, ``node_us`` per other node, and for memory-bound nodes (pooling, Concat, Transpose,
normalizations, Softmax, elementwise ops ONNX Runtime does not fuse into the weight op before them)
``KernelTable.memory_ns(op)`` per input element, each input's elements scaled by the kept fractions
of the groups on its axes (a MaxPool after a halved conv costs half). Elementwise ops on the only use
of a weight op's output (bias, activation, a Conv's residual Add and the activation after it) count
``node_us`` only: ONNX Runtime fuses them. Estimates are for the dims given (``dims``, batch
included: ``input:0``), else 1 for every symbolic dim, so batch 1 by default: per-node and per-run
overheads weigh as much as they do at the batch the plan is for.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxshrink import depgraph, stats
from onnxshrink.graph_utils import int_attr
from onnxshrink.kernel_table import NCHWC_KINDS, OFF_BLOCK, WINDOW_NS, KernelTable

#: Ops that move no data, or whose cost ``node_us`` covers (shape arithmetic, views).
FREE = frozenset({"Constant", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size",
                  "ConstantOfShape", "Cast", "Dropout"})
#: Ops ONNX Runtime fuses into a Conv/Gemm/MatMul whose only use they are (bias, activation, residual sum).
FUSABLE = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add",
                     "Sum", "BatchNormalization"})
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclasses.dataclass
class Axis:
    """Cells of one weight axis: ``fixed`` ones plus, per live group, cells scaled by its kept fraction."""

    total: int
    fixed: float
    terms: list[tuple[int, float]]  # (live group index, cells of this axis in the group)

    def kept(self, fractions: np.ndarray) -> float:
        return self.fixed + sum(cells * fractions[i] for i, cells in self.terms)


@dataclasses.dataclass
class LayerCost:
    name: str
    kind: str
    macs: int  # unpruned, batch 1
    cin: int
    cout: int
    hw: int
    out: Axis
    in_: Axis
    depthwise: bool

    def widths(self, fractions: np.ndarray) -> tuple[float, float, float]:
        """(input width, output width, MACs) at these kept fractions of the live groups."""
        fo = self.out.kept(fractions) / max(self.out.total, 1)
        fi = self.in_.kept(fractions) / max(self.in_.total, 1)
        cout = self.cout * fo
        cin = cout if self.depthwise else self.cin * fi
        return cin, cout, self.macs * fo * fi

    def latency_us(self, fractions: np.ndarray, table: KernelTable) -> float:
        cin, cout, macs = self.widths(fractions)
        if macs <= 0:
            return table.node_us
        gmacs_scale = 1.0
        if self.kind in NCHWC_KINDS and table.block > 1:
            padded = max(math.ceil(cout / table.block - 1e-9), 1) * table.block
            macs *= padded / max(cout, 1e-9)
            cout = padded
            if not self.depthwise and cin > table.block and _off_block(cin, table.block):
                gmacs_scale = OFF_BLOCK
        gmacs = table.gmacs(self.kind, cin, cout, self.hw) * gmacs_scale
        return table.node_us + macs / (gmacs * 1e3)


def _off_block(width: float, block: int) -> bool:
    return abs(width / block - round(width / block)) > 1e-6


@dataclasses.dataclass
class NodeCost:
    """A memory-bound node: ``node_us`` plus ``ns`` per input element; each input's elements scale
    with the kept fractions of the axes in ``inputs`` (elements, [axes of live groups])."""

    name: str
    ns: float
    inputs: list[tuple[int, list[Axis]]]

    def elements(self, fractions: np.ndarray) -> float:
        return sum(n * math.prod(a.kept(fractions) / max(a.total, 1) for a in axes) for n, axes in self.inputs)

    def latency_us(self, fractions: np.ndarray, table: KernelTable) -> float:
        return table.node_us + self.ns * self.elements(fractions) / 1e3

    def terms(self) -> set[int]:
        return {i for _, axes in self.inputs for a in axes for i, _ in a.terms}


class CostModel:
    """Latency (us) or MACs of a model for a vector of kept atoms per live group."""

    def __init__(self, layers: list[LayerCost], atoms: list[int], other_nodes: int, table: KernelTable,
                 metric: str = "latency", nodes: list[NodeCost] = (), batch: int = 1) -> None:
        """``other_nodes``: nodes costing ``node_us`` each; ``nodes``: memory-bound nodes (in the latency
        metric, and in :meth:`describe`'s latency whatever the metric); ``batch``: the batch the model
        is costed at (its shapes already carry it)."""
        if metric not in ("latency", "macs"):
            raise ValueError(f"metric must be 'latency' or 'macs', not {metric!r}")
        self.atoms = np.asarray(atoms, dtype=float)
        self.table = table
        self.metric = metric
        self.batch = batch
        self.other_nodes = other_nodes
        self.weights = list(layers)
        self.nodes = list(nodes)
        varying = [n for n in self.nodes if n.terms()]
        self.layers: list = [*self.weights, *varying] if metric == "latency" else list(self.weights)
        fixed = [n for n in self.nodes if not n.terms()]  # what the widths do not change
        self.constant = self._latency(np.ones(len(atoms)), fixed) if metric == "latency" else 0.0
        self.by_group: dict[int, list[int]] = defaultdict(list)
        for j, layer in enumerate(self.layers):
            for i in _terms(layer):
                self.by_group[i].append(j)

    def fractions(self, keep) -> np.ndarray:
        return np.asarray(keep, dtype=float) / np.maximum(self.atoms, 1)

    def layer_costs(self, keep) -> np.ndarray:
        f = self.fractions(keep)
        return np.array([self._one(layer, f) for layer in self.layers])

    def _one(self, layer: LayerCost | NodeCost, f: np.ndarray) -> float:
        return layer.latency_us(f, self.table) if self.metric == "latency" else layer.widths(f)[2]

    def total(self, keep) -> float:
        return self.constant + float(self.layer_costs(keep).sum())

    def delta(self, keep, costs: np.ndarray, group: int, new_keep: int) -> tuple[float, dict[int, float]]:
        """Change of the total when ``group`` keeps ``new_keep`` atoms; new costs of the layers it touches."""
        trial = np.array(keep, dtype=float)
        trial[group] = new_keep
        f = self.fractions(trial)
        new = {j: self._one(self.layers[j], f) for j in self.by_group.get(group, [])}
        return sum(v - costs[j] for j, v in new.items()), new

    def describe(self, keep) -> dict:
        """Estimated latency (us) and MACs at ``keep``, whatever the metric."""
        f = self.fractions(keep)
        macs = sum(layer.widths(f)[2] for layer in self.weights)
        return {"latency_us": float(self._latency(f, [*self.weights, *self.nodes])), "macs": round(float(macs))}

    def _latency(self, f: np.ndarray, parts) -> float:
        """Per-run overhead, ``node_us`` per other node and the latency of ``parts`` at fractions ``f``."""
        return (self.table.run_us + self.table.node_us * self.other_nodes
                + sum(part.latency_us(f, self.table) for part in parts))


def _terms(layer: LayerCost | NodeCost) -> set[int]:
    if isinstance(layer, NodeCost):
        return layer.terms()
    return {i for i, _ in layer.out.terms} | {i for i, _ in layer.in_.terms}


def build(model: ir.Model, dg: depgraph.DepGraph, live: list[depgraph.Group], table=None,
          metric: str = "latency", *, dims=None) -> CostModel:
    """The cost model of ``model``'s weight layers over the ``live`` groups (whose widths may change).
    ``table``: a :class:`KernelTable` or what :func:`onnxshrink.kernel_table.load` takes; a measured
    table is measured at the spatial sizes of the model's convs (powers of 2 from 4 to 64) and at the
    batch the model is costed at (:func:`planning_batch`).
    ``dims``: input dims (``stats.inferred_shapes``) the model is costed at; symbolic ones left out
    count as 1."""
    from onnxshrink import kernel_table

    shapes = stats.inferred_shapes(model, dims)
    index = {g.id: i for i, g in enumerate(live)}
    cells = _axis_cells(dg, index)
    layers = []
    for node in model.graph:
        layer = _layer(node, shapes, cells)
        if layer is not None:
            layers.append(layer)
    names = {layer.name for layer in layers}
    hws = sorted({min(max(2 ** round(math.log2(max(x.hw, 1))), 4), 64) for x in layers if x.kind != "gemm"})
    batch = planning_batch(model, dims)
    table = kernel_table.load(table, hws=hws or (16,), batch=batch)
    other, nodes = 0, []
    for node in model.graph:
        if (node.name or node.outputs[0].name) in names or node.op_type == "Constant":
            continue
        cost = _memory_node(node, shapes, cells, table)
        if cost is None:
            other += 1
        else:
            nodes.append(cost)
    return CostModel(layers, [g.width for g in live], other, table, metric, nodes, batch)


def _memory_node(node: ir.Node, shapes, cells, table: KernelTable) -> NodeCost | None:
    """The per-element cost of a memory-bound node; None for one costing ``node_us`` only."""
    if node.op_type in FREE or node.domain not in ("", "ai.onnx") or _fused(node):
        return None
    ns = table.memory_ns(node.op_type)
    kernel = node.attributes.get("kernel_shape")
    if kernel is not None:  # pooling: taps per input element
        strides = node.attributes.get("strides")
        ns += WINDOW_NS * math.prod(kernel.as_ints()) / math.prod(strides.as_ints() if strides else [1])
    inputs = []
    for v in node.inputs:
        shape = shapes.get(v.name) if v is not None and not depgraph.is_const(v) else None
        if shape is None:
            continue
        axes = [_axis_of(cells, v, key, shape) for key in cells.get(v, ())]
        inputs.append((int(np.prod([d if isinstance(d, int) else 1 for d in shape])), axes))
    return NodeCost(node.name or node.outputs[0].name, ns, inputs) if ns > 0 and inputs else None


def _fused(node: ir.Node, depth: int = 0) -> bool:
    """ONNX Runtime fuses this elementwise op into the weight op (or the fused op) feeding it, whose
    output has no other use: Conv(+Add)(+activation), Gemm/MatMul + bias."""
    if node.op_type not in FUSABLE or depth > 1:
        return False
    for v in node.inputs:
        p = v.producer() if v is not None else None
        if p is None or len(v.uses()) != 1:
            continue
        if p.op_type in WEIGHT_OPS or (p.op_type in FUSABLE and _on_conv(p) and _fused(p, depth + 1)):
            return True
    return False


def _on_conv(node: ir.Node) -> bool:
    return any(v is not None and (p := v.producer()) is not None and p.op_type == "Conv" for v in node.inputs)


def _axis_cells(dg: depgraph.DepGraph, index: dict[int, int]) -> dict:
    """(weight value, axis) -> [(live group index or None, cells of the axis in that group)], and
    activation value -> {axes: [(live group index or None, cells)]} for the memory-bound nodes."""
    out: dict = defaultdict(list)
    for g in dg.groups:
        for s in g.slots:
            n = sum(len(a[s]) for a in g.atoms)
            if depgraph.is_const(s.value):
                if len(s.axes) == 1:
                    out[(s.value, s.axes[0])].append((index.get(g.id), n))
            else:
                out.setdefault(s.value, defaultdict(list))[s.axes].append((index.get(g.id), n))
    return out


def _axis_of(cells, v: ir.Value, axes: tuple[int, ...], shape) -> Axis:
    """The kept cells of ``axes`` of activation ``v`` (their cells counted over all those axes)."""
    total = int(np.prod([shape[a] if a < len(shape) and isinstance(shape[a], int) else 1 for a in axes]))
    return _kept_axis(total, cells[v][axes])


def _layer(node: ir.Node, shapes, cells) -> LayerCost | None:
    if node.op_type not in depgraph.WEIGHT_AXES or len(node.inputs) < 2:
        return None
    axes = depgraph.weight_axes(node, 1)
    y = shapes.get(node.outputs[0].name)
    if axes is None or y is None:
        return None
    w = node.inputs[1]
    wshape = shapes.get(w.name) or tuple(w.const_value.shape)
    group = int_attr(node, "group", 1)
    conv = node.op_type in ("Conv", "ConvTranspose")
    cin = wshape[axes[1]] * (group if node.op_type == "Conv" else 1)
    cout = wshape[axes[0]] * (group if node.op_type == "ConvTranspose" else 1)
    depthwise = conv and group > 1 and group == cin
    if not conv:
        kind, hw = "gemm", int(np.prod([d if isinstance(d, int) else 1 for d in y[:-1]]))
    else:
        kind = "depthwise" if depthwise else ("conv1x1" if all(k == 1 for k in wshape[2:]) else "conv")
        hw = round(math.sqrt(np.prod([d if isinstance(d, int) else 1 for d in y[2:]])))
    return LayerCost(node.name or node.outputs[0].name, kind, stats.node_macs(node, shapes), cin, cout, hw,
                     _axis(cells, w, axes[0], wshape), _axis(cells, w, axes[1], wshape), depthwise)


def _axis(cells, w: ir.Value, axis: int, wshape) -> Axis:
    return _kept_axis(int(wshape[axis]), cells.get((w, axis), []))


def _kept_axis(total: int, entries) -> Axis:
    """An axis of ``total`` cells, ``entries`` of them [(live group index or None, cells)]: the cells
    of live groups scale with their kept fraction, the rest are fixed."""
    live = [(i, float(n)) for i, n in entries if i is not None]
    return Axis(total, float(total - sum(n for _, n in live)), live)


def planning_batch(model: ir.Model, dims) -> int:
    """The batch the estimates are taken at: the first input's axis 0, from the model or ``dims``."""
    from onnxshrink import data

    specs = data.input_specs(model)
    shape = specs[0].concrete_shape(dims) if specs else ()
    return int(shape[0]) if shape else 1
