"""The ``dynamic_quantize`` pass: int8 weights for MatMul/Gemm (and LSTM), activations quantized at run time.

Rule: a ``MatMul(x, W)`` with a constant float32 2-D ``W`` [K, N], or a ``Gemm(x, W, C)`` with
``transA = 0`` (``alpha`` and ``transB`` folded into ``W``, ``beta`` into ``C``), becomes standard ONNX:

    xq, xs, xz = DynamicQuantizeLinear(x)                # uint8, per tensor, at run time
    acc = MatMulInteger(xq, Wq, xz, Wz)                  # Wq int8 [K, N] symmetric, Wz int8 zeros
    y = Mul(Cast(acc, float), Mul(xs, Ws))  [+ Add(C)]   # Ws per column (per channel) or per tensor

ONNX Runtime's CPU EP fuses the pattern (``MatMulIntegerToFloatFusion`` then
``DynamicQuantizeMatMulFusion``) into one ``com.microsoft.DynamicQuantizeMatMul``, a constant ``[N]``
bias ``Add`` included, per-column scales included (checked in ``tests/test_dynamic_quant.py``). Each
layer gets its own ``DynamicQuantizeLinear`` (the last fusion needs one per layer); where several layers
read one input (Q, K, V projections), ORT's common-subexpression elimination merges them first, and those
layers run as ``MatMulIntegerToFloat`` on one shared quantization of the input. A ``MatMul`` followed by
``Add(bias, y)`` gets the Add's inputs swapped (the fusion wants the bias second).

The last node of each rewrite takes the original node's name and its output the original output's name,
so ``explain`` and exclusions keep addressing the layer. Refuses (``stats.skip``): a non-constant or
non-2-D weight, ``transA = 1``, NaN/Inf weights, a non-float32 input, and nodes matched by ``exclude``
(fnmatch patterns or ``re:REGEX`` on node names). Needs opset >= 11.

An ``LSTM`` with constant weights becomes ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM`` (int8
weights, input and state quantized at run time; see ``_dynamic_lstm``) unless ``lstm=False``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re

import numpy as np
import onnx_ir as ir
from onnxshrink.passes import _dynamic_lstm
from onnxshrink.passes._qdq_math import symmetric_scale

from onnxshrink import model_io
from onnxshrink.errors import ConfigError, UnsupportedModelError
from onnxshrink.graph_utils import (
    NameGen,
    add_initializer,
    bypass,
    const_array,
    float_attr,
    int_attr,
    is_default_domain,
)
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass

OPS = ("MatMul", "Gemm", "LSTM")


@dataclasses.dataclass(frozen=True)
class DynamicQuantConfig:
    """``per_channel``: one weight scale per output column; ``reduce_range``: weights the GEMM cannot
    clip, for CPUs whose MatMulInteger saturates 8-bit ones (AVX2 without VNNI; ``quantize`` sets it
    from ``onnxshrink.ort_int8.saturating_ops``, the pass opens no session): pair-safe scales
    (``_qdq_math.pair_safe_scale``), as fast as 7-bit weights and more exact on every model of
    ``benchmarks/results/dynamic_weights_avx2.md``; ``exclude``: node-name patterns kept float
    (fnmatch, or ``re:REGEX``)."""

    per_channel: bool = True
    reduce_range: bool = False
    #: How ``reduce_range`` narrows: ``pair_safe`` (the default) or ``7bit`` (``[-64, 64]``, the rule
    #: before pair-safe scales, kept for ``benchmarks/bench_dynamic_weights.py``).
    narrow: str = "pair_safe"
    exclude: tuple[str, ...] = ()
    #: LSTMs become ``com.microsoft.DynamicQuantizeLSTM`` (``_dynamic_lstm``; ONNX Runtime only)
    lstm: bool = True

    def __post_init__(self) -> None:
        if self.narrow not in ("pair_safe", "7bit"):
            raise ConfigError(f"narrow must be 'pair_safe' or '7bit', not {self.narrow!r}")
        for pat in self.exclude:
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise ConfigError(f"dynamic_quantize: exclude pattern {pat!r} is not a valid regex: {e}") from e


def excluded(name: str | None, patterns) -> bool:
    name = name or ""
    return any(re.search(p[3:], name) if p.startswith("re:") else fnmatch.fnmatchcase(name, p) for p in patterns)


class DynamicQuantPass(ShrinkPass):
    """Rewrite MatMul/Gemm with constant weights into DynamicQuantizeLinear + MatMulInteger (see module)."""

    name = "dynamic_quantize"
    Config = DynamicQuantConfig
    changes = Changes.TOPOLOGY | Changes.WEIGHTS | Changes.DTYPES | Changes.NUMERICS
    lossy = True

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        opset = model_io.default_opset(model) or 0
        if opset < 11:
            raise UnsupportedModelError(f"pass 'dynamic_quantize': opset {opset} < 11 (DynamicQuantizeLinear)")
        names = NameGen(model)
        for graph in model.graphs():
            for node in list(graph):
                if node.op_type not in OPS or not is_default_domain(node):
                    continue
                if node.op_type == "LSTM" and not self.config.lstm:
                    continue
                reason = self._refusal(node)
                if reason:
                    stats.skip(node, reason)
                    continue
                if node.op_type == "LSTM":
                    _dynamic_lstm.rewrite(node, graph, model, names, self.config.per_channel,
                                          self.config.narrow if self.config.reduce_range else None)
                    stats.add("lstm_layers_dynamic")
                    continue
                _Rewrite(node, graph, names, self.config).run()
                stats.add("linear_layers_dynamic")

    def _refusal(self, node: ir.Node) -> str | None:
        if excluded(node.name, self.config.exclude):
            return "name matches an exclude pattern"
        return refusal(node)


def refusal(node: ir.Node) -> str | None:
    """Why ``node`` (MatMul, Gemm or LSTM) cannot be quantized dynamically, or None."""
    if node.op_type == "LSTM":
        return _dynamic_lstm.refusal(node)
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if const_array(node.inputs[0]) is not None:
        return "its first operand is constant"
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return "the weight is not a constant 2-D float32 tensor"
    if not np.all(np.isfinite(w)):
        return "the weight holds NaN or Inf"
    x = node.inputs[0]
    if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        return f"input {x.name!r} is {x.dtype}, not float32"
    if node.op_type == "Gemm":
        if int_attr(node, "transA", 0):
            return "Gemm with transA=1"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = const_array(node.inputs[2])
            if c is None or c.dtype != np.float32:
                return "the Gemm bias is not a float32 constant"
    return None


def weight_scales(w: np.ndarray, per_channel: bool, reduce_range: bool,
                  narrow: str = "pair_safe") -> tuple[np.ndarray, np.ndarray]:
    """``(Wq int8, scale float32)`` of a [K, N] weight, symmetric, per column or per tensor; with
    ``reduce_range``, narrowed as ``narrow`` says (``_qdq_math.symmetric_scale``; pair-safe: neighbours
    along K never sum past 128)."""
    scale = symmetric_scale(w, 0, 0 if per_channel else (0, 1), narrow if reduce_range else None)
    wq = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return wq, scale


class _Rewrite:
    """One MatMul/Gemm into the dynamic pattern."""

    def __init__(self, node: ir.Node, graph, names: NameGen, cfg: DynamicQuantConfig) -> None:
        self.node, self.graph, self.names, self.cfg = node, graph, names, cfg
        self.base = node.name or node.outputs[0].name or node.op_type

    def _new(self, op: str, inputs, hint: str, dtype=None, **attrs) -> ir.Node:
        attributes = [ir.AttrInt64(k, v) for k, v in attrs.items()]
        n = ir.Node("", op, inputs, attributes=attributes, num_outputs=3 if op == "DynamicQuantizeLinear" else 1,
                    name=self.names(f"{self.base}_{hint}"))
        for i, out in enumerate(n.outputs):
            out.name = self.names(f"{self.base}_{hint}" + (f"_{i}" if len(n.outputs) > 1 else ""))
        if dtype is not None:
            n.outputs[0].dtype = dtype
        self.graph.insert_before(self.node, n)
        return n

    def _init(self, array: np.ndarray, hint: str) -> ir.Value:
        return add_initializer(self.graph, array, self.names(f"{self.base}_{hint}"))

    def run(self) -> None:
        node = self.node
        w, bias = self._weight_and_bias()
        wq, ws = weight_scales(w, self.cfg.per_channel, self.cfg.reduce_range, self.cfg.narrow)
        dql = self._new("DynamicQuantizeLinear", [node.inputs[0]], "dql")
        dql.outputs[0].dtype, dql.outputs[1].dtype, dql.outputs[2].dtype = (
            ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)
        wzp = np.zeros(ws.shape, np.int8)
        mmi = self._new("MatMulInteger", [dql.outputs[0], self._init(wq, "wq"), dql.outputs[2],
                                          self._init(wzp, "wzp")], "mmi", ir.DataType.INT32)
        cast = self._new("Cast", [mmi.outputs[0]], "cast", ir.DataType.FLOAT, to=ir.DataType.FLOAT.value)
        scale = self._new("Mul", [dql.outputs[1], self._init(ws, "ws")], "scale", ir.DataType.FLOAT)
        last = self._new("Mul", [cast.outputs[0], scale.outputs[0]], "out", ir.DataType.FLOAT)
        if bias is not None:
            last = self._new("Add", [last.outputs[0], self._init(bias, "bias")], "bias", ir.DataType.FLOAT)
        self._finish(last)

    def _weight_and_bias(self) -> tuple[np.ndarray, np.ndarray | None]:
        node = self.node
        w = const_array(node.inputs[1]).astype(np.float32)
        if node.op_type == "MatMul":
            self._bias_second()
            return w, None
        if int_attr(node, "transB", 0):
            w = w.T
        w = np.ascontiguousarray(w * np.float32(float_attr(node, "alpha", 1.0)), dtype=np.float32)
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return w, None
        c = const_array(node.inputs[2]).astype(np.float32) * np.float32(float_attr(node, "beta", 1.0))
        if c.size in (1, w.shape[1]) and c.ndim <= 2 and (c.ndim < 2 or c.shape[0] == 1):
            c = np.broadcast_to(c.reshape(-1), (w.shape[1],))
        return w, np.ascontiguousarray(c, dtype=np.float32)

    def _bias_second(self) -> None:
        """``Add(bias, y)`` after the MatMul becomes ``Add(y, bias)`` (the bias fusion reads input 1)."""
        y = self.node.outputs[0]
        uses = list(y.uses())
        if len(uses) != 1 or y.is_graph_output():
            return
        add = uses[0].node
        bias_first = uses[0].idx == 1 and const_array(add.inputs[0]) is not None
        if add.op_type == "Add" and is_default_domain(add) and bias_first:
            a, b = add.inputs[0], add.inputs[1]
            add.replace_input_with(0, b)
            add.replace_input_with(1, a)

    def _finish(self, last: ir.Node) -> None:
        node, old = self.node, self.node.outputs[0]
        name, out_name = node.name, old.name
        new = last.outputs[0]
        new.shape = old.shape
        reason = bypass(node, old, new)
        if reason:  # pragma: no cover - bypass refuses only graph-output corner cases new nodes never hit
            raise UnsupportedModelError(f"pass 'dynamic_quantize': cannot rewire {node.op_type} {name!r}: {reason}")
        if name:
            last.name = name
        if out_name and new.name != out_name:
            new.name = out_name
