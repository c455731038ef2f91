"""The layers a least-squares refit can rewrite, and the topological stages it runs them in.

Each layer turns its tapped input into a feature matrix (a Conv unfolds patches), its original output
into target rows (kept output channels only), and writes a solution ``W_aug`` ([features + 1, outputs],
the last row the bias) back into the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import NameGen, add_initializer, attr_value, const_array, const_shape, int_attr


@dataclasses.dataclass
class Layer:
    node: ir.Node
    x: ir.Value  # input in the pruned model
    target: ir.Value  # output to match (a MatMul's bias Add output when there is one)

    @property
    def name(self) -> str:
        return self.node.name or self.target.name or self.node.op_type

    @property
    def fit_bias(self) -> bool:
        return True


def kept_axis(kept: dict, value: ir.Value, axis: int):
    axes = kept.get(value.name) or {}
    idx = axes.get(axis, axes.get(str(axis)))
    return None if idx is None else np.asarray(idx, dtype=np.int64)


def replace_const(model, node: ir.Node, index: int, arr: np.ndarray, names: NameGen, spill=None) -> None:
    """Give input ``index`` of ``node`` a new initializer (never edit a shared one in place); ``spill``
    (an ``onnxshrink.spill.Spill``) may move its data out of anonymous memory."""
    old = node.inputs[index] if index < len(node.inputs) else None
    base = (old.name if old is not None else None) or f"{node.name or node.op_type}_in{index}"
    arr = arr.astype(_float_type(node, old))
    new = add_initializer(model.graph, spill(arr) if spill else arr, names(f"{base}_refit"))
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    if old is not None and not old.uses() and old.is_initializer() and not old.is_graph_input():
        model.graph.initializers.pop(old.name, None)


def _float_type(node: ir.Node, old: ir.Value | None) -> np.dtype:
    """The element type the refit constant must keep: the one it replaces, else the layer's weight's
    (a float16 model's refit weights stay float16; float32 arithmetic, one rounding at the end)."""
    for v in (old, node.inputs[1] if len(node.inputs) > 1 else None):
        if v is not None and v.dtype is not None and v.dtype.is_floating_point():
            return v.dtype.numpy()  # the declared type: no weight is read to learn it
    return np.dtype(np.float32)


class ConvLayer(Layer):
    def _geometry(self):
        w = const_array(self.node.inputs[1])
        k = w.shape[2:]
        strides = list(attr_value(self.node, "strides", None) or [1] * len(k))
        dil = list(attr_value(self.node, "dilations", None) or [1] * len(k))
        pads = list(attr_value(self.node, "pads", None) or [0] * (2 * len(k)))
        return w, k, strides, dil, pads

    def features(self, x: np.ndarray) -> np.ndarray:
        _w, k, strides, dil, pads = self._geometry()
        return im2col(x, k, strides, dil, pads)

    def targets(self, y: np.ndarray, kept: dict) -> np.ndarray:
        idx = kept_axis(kept, self.target, 1)
        y = y if idx is None else y[:, idx]
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])

    def current_solution(self) -> np.ndarray:
        w = const_array(self.node.inputs[1])
        b = const_array(self.node.inputs[2]) if len(self.node.inputs) > 2 and self.node.inputs[2] else None
        b = np.zeros(w.shape[0]) if b is None else b
        return np.vstack([w.reshape(w.shape[0], -1).T, b[None, :]]).astype(np.float64)

    def write(self, model, w_aug: np.ndarray, names: NameGen, spill=None) -> None:
        shape = const_shape(self.node.inputs[1])
        replace_const(model, self.node, 1, w_aug[:-1].T.reshape(shape), names, spill)
        replace_const(model, self.node, 2, w_aug[-1], names, spill)


class GemmLayer(Layer):
    def features(self, x):
        return x.T if int_attr(self.node, "transA", 0) else x

    def targets(self, y, kept):
        idx = kept_axis(kept, self.target, 1)
        return y if idx is None else y[:, idx]

    def _parts(self):
        b = const_array(self.node.inputs[1])
        b = b.T if int_attr(self.node, "transB", 0) else b
        c = const_array(self.node.inputs[2]) if len(self.node.inputs) > 2 and self.node.inputs[2] else None
        return b, c, attr_value(self.node, "alpha", 1.0), attr_value(self.node, "beta", 1.0)

    def current_solution(self):
        b, c, alpha, beta = self._parts()
        bias = np.zeros(b.shape[1]) if c is None else np.broadcast_to(beta * c, (1, b.shape[1]))[0]
        return np.vstack([alpha * b, bias[None, :]]).astype(np.float64)

    def write(self, model, w_aug, names, spill=None):
        _b, c, alpha, beta = self._parts()
        new_b = w_aug[:-1] / alpha
        replace_const(model, self.node, 1, new_b.T if int_attr(self.node, "transB", 0) else new_b, names, spill)
        shape = c.shape if c is not None and c.size == w_aug.shape[1] else (w_aug.shape[1],)
        replace_const(model, self.node, 2, (w_aug[-1] / (beta if c is not None else 1.0)).reshape(shape),
                      names, spill)


class MatMulLayer(Layer):
    bias_add: ir.Node | None = None
    bias_index: int = 1

    def features(self, x):
        return x.reshape(-1, x.shape[-1])

    def targets(self, y, kept):
        idx = kept_axis(kept, self.target, y.ndim - 1)
        y = y if idx is None else y[..., idx]
        return y.reshape(-1, y.shape[-1])

    def current_solution(self):
        w = const_array(self.node.inputs[1])
        bias = np.zeros(w.shape[1])
        if self.bias_add is not None:
            bias = const_array(self.bias_add.inputs[self.bias_index]).reshape(-1)
        return np.vstack([w, bias[None, :]]).astype(np.float64)

    def write(self, model, w_aug, names, spill=None):
        replace_const(model, self.node, 1, w_aug[:-1], names, spill)
        if self.bias_add is not None:
            shape = const_shape(self.bias_add.inputs[self.bias_index])
            replace_const(model, self.bias_add, self.bias_index, w_aug[-1].reshape(shape), names, spill)

    @property
    def fit_bias(self) -> bool:
        return self.bias_add is not None


def im2col(x: np.ndarray, k, strides, dil, pads) -> np.ndarray:
    """Patches of a 2-D conv input [N, C, H, W] as rows [N*OH*OW, C*kh*kw] (weight order)."""
    n, c = x.shape[:2]
    xp = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    span = [(k[i] - 1) * dil[i] + 1 for i in range(2)]
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
    win = win[:, :, :: strides[0], :: strides[1], :: dil[0], :: dil[1]]
    oh, ow = win.shape[2], win.shape[3]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * k[0] * k[1])


def find_layers(model: ir.Model, kept: dict) -> tuple[list[Layer], list[str]]:
    """Consumer layers whose input channels were pruned, and the ones that cannot be refit (why)."""
    layers, skipped = [], []
    for node in model.graph:
        x = node.inputs[0] if node.inputs else None
        if x is None or node.op_type not in ("Conv", "Gemm", "MatMul") or x.name not in kept:
            continue
        if len(node.inputs) < 2 or const_array(node.inputs[1]) is None:
            continue
        why = _why_not(node, x, kept)
        if why:
            skipped.append(f"{node.name or node.op_type}: {why}")
            continue
        layers.append(_make(node, x))
    return layers, skipped


def _why_not(node, x, kept) -> str | None:
    shape = x.shape
    rank = len(shape) if shape is not None else None
    if node.op_type == "Conv":
        if int_attr(node, "group", 1) != 1:
            return "grouped conv is not refit (its kept outputs do not lose inputs)"
        if rank != 4 or attr_value(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "only 2-D convs with explicit pads are refit"
        return None if kept_axis(kept, x, 1) is not None else "its input channels were not pruned"
    if node.op_type == "Gemm":
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and (const_array(c) is None or const_array(c).ndim == 2 and const_array(c).shape[0] != 1):
            return "Gemm C is not a constant row"
        return None if kept_axis(kept, x, 0 if int_attr(node, "transA", 0) else 1) is not None \
            else "its input features were not pruned"
    if const_array(node.inputs[1]).ndim != 2:
        return "MatMul weight is not 2-D"
    return None if rank and kept_axis(kept, x, rank - 1) is not None else "its input features were not pruned"


def _make(node, x) -> Layer:
    y = node.outputs[0]
    if node.op_type == "Conv":
        return ConvLayer(node, x, y)
    if node.op_type == "Gemm":
        return GemmLayer(node, x, y)
    layer = MatMulLayer(node, x, y)
    uses = list(y.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not y.is_graph_output():
        add = uses[0].node
        other = 1 - uses[0].idx
        bias = const_array(add.inputs[other])
        w = const_array(node.inputs[1])
        if bias is not None and bias.size == w.shape[1] and bias.shape[-1:] == (w.shape[1],):
            layer.bias_add, layer.bias_index, layer.target = add, other, add.outputs[0]
    return layer


def stages(model: ir.Model, layers: list[Layer]) -> list[list[Layer]]:
    """Split ``layers`` (any order) into consecutive stages, none depending on another of its stage.

    One sweep in graph order marks every node with the last layer (in layer order) it depends on; a
    layer opens a new stage when its input depends on a layer of the current one. (Walking each
    layer's ancestors instead was quadratic in depth.)"""
    order = {n: i for i, n in enumerate(model.graph)}
    todo = sorted(layers, key=lambda layer: order.get(layer.node, 0))
    index = {layer.node: j for j, layer in enumerate(todo)}
    last: dict[ir.Node, int] = {}
    for node in model.graph:
        ups = [last.get(v.producer(), -1) for v in node.inputs if v is not None and v.producer() is not None]
        last[node] = max([index.get(node, -1), *ups])
    out: list[list[Layer]] = []
    current: list[Layer] = []
    start = 0
    for j, layer in enumerate(todo):
        producer = layer.x.producer()
        if current and producer is not None and last.get(producer, -1) >= start:
            out.append(current)
            current, start = [], j
        current.append(layer)
    if current:
        out.append(current)
    return out


def feature_count(node: ir.Node) -> int | None:
    """Input features of a refittable layer's weight (rows of its refit, without the bias), from the
    weight's shape only (a weight sliced lazily by pruning is not computed)."""
    from onnxshrink.depgraph import weight_axes

    shape, axes = const_shape(node.inputs[1]), weight_axes(node, 1)
    if shape is None or axes is None:
        return None
    return int(np.prod(shape[1:])) if node.op_type == "Conv" else int(shape[axes[1]])


def gram_bytes(node: ir.Node) -> int:
    """Bytes of one float64 Gram matrix of the layer's inputs and the bias."""
    return ((feature_count(node) or 0) + 1) ** 2 * 8
