"""The ``cross_layer_equalization`` pass: equal per-channel weight ranges across layer pairs.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", section 4.1.
For a pair ``layer1 -> [act] -> layer2`` (``Conv`` or ``Gemm`` with constant weights, any groups,
depthwise included), channel ``c`` of layer1's output is channel ``c`` of layer2's input. With
``r1[c] = max |W1[c]|`` (layer1's output channel) and ``r2[c] = max |W2[:, c]|`` (layer2's rows that read
``c``: its group), ``s[c] = sqrt(r1[c] / r2[c])`` and

    W1[c] /= s[c],  b1[c] /= s[c],  W2[:, c] *= s[c]

both ranges become ``sqrt(r1 r2)``. The model computes the same function in real arithmetic because
``act(x / s) = act(x) / s`` for ``s > 0`` (the act is positively homogeneous); in float32 the outputs
match within rounding. Pairs are swept until the scales settle (``max |log s| < tol``) or ``iterations``,
since a layer in two pairs moves both.

Activations between: none, ``Relu``, ``LeakyRelu``, ``PRelu`` with a constant slope. ``Clip`` (Relu6) is
not homogeneous: ``clip(x / s, 0, u) != clip(x, 0, u) / s`` once ``x`` reaches ``u``. A channel behind a
Clip with lower bound 0 (or none) is scaled only when interval arithmetic proves ``x <= u`` for every
input (layer1's input comes from a Clip/Relu with finite bounds) and ``s`` is raised so that ``x / s <= u``
too; every other channel keeps ``s = 1`` (counted as ``channels_pinned_by_clip``).

Refuses (``stats.skip``): an activation that is not positively homogeneous (HardSwish, Sigmoid, Add, a
Clip with a non-zero lower bound), an intermediate tensor with other users or that is a graph output,
weights that are not float32 constants or that another node shares, mismatched channel counts, and
``Gemm`` with ``transA = 1``. Changes weights, and renames the tensors between a rescaled pair (they hold
``x / s`` now); shapes and topology stay.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import (
    NameGen,
    add_initializer,
    const_array,
    float_attr,
    int_attr,
    is_default_domain,
    rename_changed,
)
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass

HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
MAX_STEP = 1e3  # one sweep never scales a channel by more than this (dead channels, r -> 0)


@dataclasses.dataclass(frozen=True)
class EqualizeConfig:
    """``iterations``: sweeps over all pairs at most; ``tol``: stop when every ``|log s|`` is below it."""

    iterations: int = 20
    tol: float = 1e-3


class _Layer:
    """A Conv or Gemm whose weight (and bias) arrays are edited in memory, written back at the end."""

    def __init__(self, node: ir.Node) -> None:
        self.node = node
        self.w = const_array(node.inputs[1]).astype(np.float64)
        b = node.inputs[2] if len(node.inputs) > 2 else None
        self.b = const_array(b).astype(np.float64) if b is not None else None
        self.conv = node.op_type == "Conv"
        self.group = int_attr(node, "group", 1) if self.conv else 1
        self.trans_b = bool(int_attr(node, "transB", 0)) if not self.conv else False
        self.changed = False
        self.out_scaled = False  # its output (and the activation after it) now holds x / s

    @property
    def n_out(self) -> int:
        return self.w.shape[0] if self.conv or self.trans_b else self.w.shape[1]

    @property
    def n_in(self) -> int:
        if self.conv:
            return self.w.shape[1] * self.group
        return self.w.shape[1] if self.trans_b else self.w.shape[0]

    def out_major(self) -> np.ndarray:
        """Weights as [C_out, -1]."""
        w = self.w if self.conv or self.trans_b else self.w.T
        return w.reshape(w.shape[0], -1)

    def out_ranges(self) -> np.ndarray:
        return np.abs(self.out_major()).max(axis=1)

    def _in_view(self) -> np.ndarray:
        """[C_out, C_in_per_group, -1] (Conv) or [C_out, C_in] (Gemm) view, rows = output channels."""
        if self.conv:
            return self.w.reshape(self.w.shape[0], self.w.shape[1], -1)
        return self.w if self.trans_b else self.w.T

    def in_ranges(self) -> np.ndarray:
        a = np.abs(self._in_view())
        per = a.max(axis=2) if self.conv else a  # [C_out, C_in_pg]
        if not self.conv:
            return per.max(axis=0)
        cout_pg, cin_pg = self.w.shape[0] // self.group, self.w.shape[1]
        return per.reshape(self.group, cout_pg, cin_pg).max(axis=1).reshape(-1)

    def scale_out(self, s: np.ndarray) -> None:
        """Divide output channel ``c`` (weights and bias) by ``s[c]``."""
        if self.conv or self.trans_b:
            self.w = self.w / s.reshape(-1, *([1] * (self.w.ndim - 1)))
        else:
            self.w = self.w / s.reshape(1, -1)
        if self.b is not None:
            self.b = self.b / (s if self.conv else s.reshape(*([1] * max(self.b.ndim - 1, 0)), -1))
        self.changed = self.out_scaled = True

    def scale_in(self, s: np.ndarray) -> None:
        """Multiply input channel ``c`` by ``s[c]``."""
        if self.conv:
            cout_pg, cin_pg = self.w.shape[0] // self.group, self.w.shape[1]
            grid = s.reshape(self.group, 1, cin_pg).repeat(cout_pg, axis=1).reshape(self.w.shape[0], cin_pg)
            self.w = self.w * grid.reshape(*grid.shape, *([1] * (self.w.ndim - 2)))
        elif self.trans_b:
            self.w = self.w * s.reshape(1, -1)
        else:
            self.w = self.w * s.reshape(-1, 1)
        self.changed = True

    def out_upper_bound(self, lo: float, hi: float) -> np.ndarray:
        """Per output channel, the largest value this layer can produce for inputs in ``[lo, hi]``
        (zero padding included)."""
        w = self.out_major()
        alpha = 1.0 if self.conv else float_attr(self.node, "alpha", 1.0)
        top = np.maximum(np.maximum(w * lo, w * hi), 0.0).sum(axis=1) * alpha
        if self.b is not None:
            beta = 1.0 if self.conv else float_attr(self.node, "beta", 1.0)
            if self.b.size not in (1, top.size):
                return np.full(top.shape, np.inf)
            top = top + np.broadcast_to(self.b.reshape(-1) * beta, top.shape)
        return top


@dataclasses.dataclass
class _Pair:
    first: _Layer
    second: _Layer
    clip_upper: float | None  # upper bound of a Clip between, None when the act is homogeneous
    input_bounds: tuple[float, float] | None  # bounds on layer1's input, when a Clip/Relu proves them


class CrossLayerEqualizationPass(ShrinkPass):
    """Rescale channels between consecutive Conv/Gemm layers so their weight ranges match (see module)."""

    name = "cross_layer_equalization"
    Config = EqualizeConfig
    changes = Changes.WEIGHTS

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        names = NameGen(model)
        for graph in model.graphs():
            layers: dict[ir.Node, _Layer] = {}
            pairs = [p for node in graph if (p := self._pair(node, layers, stats)) is not None]
            if not pairs:
                continue
            self._sweep(pairs, stats)
            for layer in layers.values():
                if layer.changed:
                    _write_back(graph, layer, names)
                    stats.add("layers_rescaled")
            rename_changed([v for p in pairs if p.first.out_scaled  # these hold x / s now
                            for v in (p.first.node.outputs[0], p.second.node.inputs[0])], names, "equalized")
            stats.add("pairs_equalized", len(pairs))

    def _sweep(self, pairs: list[_Pair], stats: PassStats) -> None:
        pinned: dict[int, int] = {}
        for sweep in range(self.config.iterations):
            worst = 0.0
            for i, pair in enumerate(pairs):
                s, n_pinned = _scales(pair)
                pinned[i] = n_pinned
                worst = max(worst, float(np.abs(np.log(s)).max(initial=0.0)))
                if np.any(s != 1.0):
                    pair.first.scale_out(s)
                    pair.second.scale_in(s)
            stats.notes["sweeps"] = sweep + 1
            if worst < self.config.tol:
                break
        stats.add("channels_pinned_by_clip", sum(pinned.values()))

    def _pair(self, node: ir.Node, layers: dict, stats: PassStats) -> _Pair | None:
        """The pair whose second layer is ``node``, or None (with a skip when a chain was refused)."""
        if not _is_layer(node) or _layer_refusal(node):
            return None
        x = node.inputs[0]
        act = x.producer()
        if act is None:
            return None
        if _is_layer(act):
            first, act = act, None
        else:
            src = act.inputs[0] if act.inputs else None
            first = src.producer() if src is not None else None
            if first is None or not _is_layer(first):
                return None
        reason = _layer_refusal(first) or _chain_refusal(first, act, node)
        clip_upper = None
        if reason is None and act is not None and act.op_type == "Clip":
            clip_upper, reason = _clip_upper(act)
        if reason:
            stats.skip(node, f"not equalized with {first.op_type} {first.name!r}: {reason}")
            return None
        for n in (first, node):
            layers.setdefault(n, _Layer(n))
        if layers[first].n_out != layers[node].n_in:
            stats.skip(node, f"channel counts differ ({layers[first].n_out} vs {layers[node].n_in})")
            return None
        return _Pair(layers[first], layers[node], clip_upper, _input_bounds(first))


def _scales(pair: _Pair) -> tuple[np.ndarray, int]:
    r1, r2 = pair.first.out_ranges(), pair.second.in_ranges()
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(r1 / r2)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    s = np.clip(s, 1.0 / MAX_STEP, MAX_STEP)
    if pair.clip_upper is None:
        return s, 0
    if pair.input_bounds is None:
        return np.ones_like(s), s.size
    top = pair.first.out_upper_bound(*pair.input_bounds)
    u = pair.clip_upper
    safe = top <= u  # the clip's upper bound is never reached at the original scale
    s = np.where(safe, np.maximum(s, np.maximum(top, 0.0) / u), 1.0)  # nor after dividing by s
    return s, int((~safe).sum())


def _is_layer(node: ir.Node) -> bool:
    return node.op_type in ("Conv", "Gemm") and is_default_domain(node)


def _layer_refusal(node: ir.Node) -> str | None:
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype != np.float32 or w.ndim < 2 or not np.all(np.isfinite(w)):
        return f"{node.op_type} {node.name!r} has no constant finite float32 weight"
    if len(node.inputs[1].uses()) > 1:
        return f"the weight of {node.op_type} {node.name!r} is shared with another node"
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if b is not None and (const_array(b) is None or len(b.uses()) > 1):
        return f"the bias of {node.op_type} {node.name!r} is not a constant of its own"
    if node.op_type == "Gemm" and int_attr(node, "transA", 0):
        return "Gemm with transA=1"
    return None


def _chain_refusal(first: ir.Node, act: ir.Node | None, second: ir.Node) -> str | None:
    mid = first.outputs[0]
    if len(mid.uses()) != 1 or mid.is_graph_output():
        return f"the intermediate tensor {mid.name!r} has other users"
    if act is None:
        return None
    out = act.outputs[0]
    if len(out.uses()) != 1 or out.is_graph_output():
        return f"the activation output {out.name!r} has other users"
    if not is_default_domain(act) or act.op_type not in (*HOMOGENEOUS, "Clip"):
        return f"the activation {act.op_type} between is not positively homogeneous (act(x/s) != act(x)/s)"
    if act.op_type == "PRelu" and const_array(act.inputs[1]) is None:
        return "the PRelu slope is not constant"
    return None


def _clip_upper(clip: ir.Node) -> tuple[float | None, str | None]:
    lo, hi = _clip_bounds(clip)
    if lo is None:
        return None, "the Clip bounds are not constant scalars"
    if lo not in (0.0, -math.inf):
        return None, f"Clip with lower bound {lo:g} is not positively homogeneous"
    if hi == math.inf:
        return None, None
    return hi, None


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    out = []
    for i, default in ((1, -math.inf), (2, math.inf)):
        v = node.inputs[i] if len(node.inputs) > i else None
        if v is None:
            out.append(default)
            continue
        arr = const_array(v)
        if arr is None or arr.size != 1:
            return None, None
        out.append(float(arr.reshape(-1)[0]))
    return out[0], out[1]


def _input_bounds(layer: ir.Node) -> tuple[float, float] | None:
    """Finite bounds of ``layer``'s input when a Clip (or Relu6-like Clip) produces it."""
    p = layer.inputs[0].producer()
    if p is None or p.op_type != "Clip" or not is_default_domain(p):
        return None
    lo, hi = _clip_bounds(p)
    if lo is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return lo, hi






def _write_back(graph, layer: _Layer, names: NameGen) -> None:
    replace_const(graph, layer.node, 1, layer.w.astype(np.float32), names)
    if layer.b is not None:
        replace_const(graph, layer.node, 2, layer.b.astype(np.float32), names)


def replace_const(graph, node: ir.Node, index: int, array: np.ndarray, names: NameGen, tag: str = "eq") -> None:
    """``node`` reads a fresh initializer holding ``array`` at ``index``; the old constant is dropped when
    nothing else reads it (a shared one stays for its other readers)."""
    old = node.inputs[index]
    new = add_initializer(graph, array, names(f"{old.name or node.name or 'w'}_{tag}"))
    node.replace_input_with(index, new)
    if old.uses() or old.is_graph_output():
        return
    if old.is_initializer() and old.name in graph.initializers:
        graph.initializers.pop(old.name)
    elif old.producer() is not None and old.producer().op_type == "Constant":
        graph.remove(old.producer(), safe=True)
