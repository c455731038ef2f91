"""The ``qdq`` pass: static int8 quantization in QDQ format, from a plan and a calibration table.

The pass only rewrites; it never opens a session. Its config holds a plan (``qdq_rules.plan_qdq``, whose
options it uses) and a calibration table (``name in table``, ``table[name].min/.max``). It re-plans the
model with the table (so tensors without a usable range stay float), then, per graph (subgraphs first):

1. removes the Relu/Clip nodes the plan folds (their bounds are already in the tensor's range);
2. stores each weight as int8 + ``DequantizeLinear`` (per channel along the plan's axis), and each bias
   of a quantized Conv/Gemm as int32 with scale = input scale x weight scale (a weight channel's scale is
   raised when its bias would overflow int32); Gemm's ``alpha`` is folded into the weight and its
   ``beta`` into the bias (QGemm fuses only alpha = beta = 1);
3. stores the constant inputs of quantized Add/Mul per tensor in the activation type (a quantized
   ``Div`` by a constant becomes ``Mul`` by its reciprocal first);
4. inserts one ``QuantizeLinear`` per planned activation, right after its producer, and one
   ``DequantizeLinear`` per reading (node, input): every reader when the producer is quantized (the
   fused kernel must own its output alone), only the quantized readers otherwise. A graph output keeps
   its name: the last ``DequantizeLinear`` takes it.

Refuses (``UnsupportedModelError``) models below opset 13 (per-channel DequantizeLinear); every scale is
checked finite and > 0 before it is written (``PassFailure`` otherwise).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxshrink.passes import _qdq_math as qm
from onnxshrink.passes.qdq_rules import GraphPlan, QDQPlan, plan_qdq

from onnxshrink import model_io
from onnxshrink.errors import ConfigError, PassFailure, UnsupportedModelError
from onnxshrink.graph_utils import NameGen, add_initializer, bypass, const_array, int_attr
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass

logger = logging.getLogger(__name__)

MIN_OPSET = 13


@dataclasses.dataclass(frozen=True)
class QDQConfig:
    """``plan``: from ``qdq_rules.plan_qdq`` (its options are used); ``table``: calibrated ranges."""

    plan: QDQPlan | None = None
    table: Any = None
    #: a ``_weight_memo.WeightMemo`` shared by the builds of one search (None: every weight computed)
    weights: Any = dataclasses.field(default=None, compare=False, repr=False)


class QDQPass(ShrinkPass):
    """Insert int8 QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into quantized kernels."""

    name = "qdq"
    Config = QDQConfig
    changes = Changes.TOPOLOGY | Changes.WEIGHTS | Changes.DTYPES | Changes.NUMERICS
    lossy = True

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        cfg = self.config
        if cfg.plan is None or cfg.table is None:
            raise ConfigError(
                "pass 'qdq' needs a plan and a calibration table; use onnxshrink.quantize(model, data) "
                "or `onnxshrink optimize IN --quantize int8 --calibration DATA`"
            )
        opset = model_io.default_opset(model) or 0
        if opset < MIN_OPSET:
            raise UnsupportedModelError(
                f"pass 'qdq': opset {opset} < {MIN_OPSET}; per-channel DequantizeLinear needs opset 13. "
                "onnxshrink.quantize upgrades the opset first (or use onnx.version_converter)"
            )
        plan = plan_qdq(model, cfg.plan.options, cfg.table)
        for node, reason in plan.skipped:
            stats.skip(node, reason)
        names = NameGen(model)
        for gp in reversed(plan.graphs):  # subgraphs before the graphs that capture their values
            _Rewriter(gp, plan, names, stats, cfg.weights).run()
        stats.notes["plan"] = plan.summary()
        if not plan.nodes:
            reasons = collections.Counter(why.split(" (")[0] for _, why in plan.skipped).most_common(3)
            logger.warning(
                "QDQ: nothing was quantized: %d nodes kept float (%s)%s", len(plan.skipped),
                "; ".join(f"{n}x {why}" for why, n in reasons) or "no quantizable op",
                " -- the network sits in subgraphs whose tensors calibration did not observe"
                if any("subgraph" in why for _, why in plan.skipped) else "",
            )


class _Rewriter:
    """Applies one ``GraphPlan``."""

    def __init__(self, gp: GraphPlan, plan: QDQPlan, names: NameGen, stats: PassStats, memo=None) -> None:
        self.gp = gp
        self.memo = memo
        self.graph = gp.graph
        self.opts = plan.options
        self.names = names
        self.stats = stats
        self.params: dict[ir.Value, qm.QParams] = {}
        self.quantized = set(gp.nodes)
        self.dead: list[ir.Value] = []
        self.weight_cache: dict[tuple, Any] = {}  # DQ of a constant read by several nodes; scale/zp pairs
        self.shared: set[int] = set()  # ids of those constants

    def run(self) -> None:
        self._activation_params()
        for r in self.gp.folds:
            reason = bypass(r, r.outputs[0], r.inputs[0])
            if reason:
                raise PassFailure(f"pass 'qdq': cannot fold {r.op_type} {r.name!r}: {reason}")
            self.stats.add("relus_folded")
        for spec in self.gp.weights:
            self._weight(spec.node, spec.index, spec.axis)
        for node, index in self.gp.consts:
            if node.op_type == "Div":
                self._div_to_mul(node, index)
            self._const_input(node, index)
        for v in self.gp.tensors:
            self._insert_qdq(v)
        self.stats.add("nodes_quantized", len(self.gp.nodes))
        self._drop_dead()

    # ------------------------------------------------------------ parameters

    def _activation_params(self) -> None:
        qtype = self.opts.activations
        for group in self.gp.groups:
            lo, hi = self.gp.ranges[group[0]]
            p = qm.activation_params(lo, hi, qtype)
            for v in group:
                self._checked(p, f"tensor {v.name!r}")
                self.params[v] = p

    def _checked(self, p: qm.QParams, what: str) -> qm.QParams:
        try:
            p.check(what)
        except ValueError as e:
            raise PassFailure(f"pass 'qdq': {e}") from e
        return p

    # ------------------------------------------------------------ weights and biases

    def _weight(self, node: ir.Node, index: int, axis: int | None) -> None:
        w = const_array(node.inputs[index])
        alpha = node.attributes["alpha"].as_float() if node.op_type == "Gemm" and "alpha" in node.attributes else 1.0
        if alpha != 1.0:  # QGemm fuses only alpha == 1: scale the weight instead
            w = (w * np.float32(alpha)).astype(np.float32)
            node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        narrow = self.opts.narrow(node.op_type)
        trans_b = node.op_type == "Gemm" and int_attr(node, "transB", 0) == 1
        pair_safe = narrow and self.opts.pair_safe
        key = None if self.memo is None else self.memo.key(node.inputs[index], node.op_type, axis, narrow,
                                                           pair_safe, trans_b, alpha)

        def params() -> tuple[qm.QParams, bool]:  # and whether the codes are clipped to 7 bits
            rows = qm.kernel_rows(w, node.op_type, axis, trans_b) if pair_safe else None
            return qm.weight_params(w, axis, narrow, rows), narrow and rows is None

        wp, seven_bits = params() if key is None else self.memo.params(key, params)
        bias = self._bias_array(node) if node in self.quantized else None
        x_scale = self.params[node.inputs[0]].scale if bias is not None else None
        if bias is not None:
            per_out = self._per_output(wp.scale, bias.size)
            fitted = qm.fit_weight_scale_to_bias(bias, x_scale, per_out)
            if not np.array_equal(fitted, per_out):
                wp = qm.QParams(_back_to_weight(fitted, wp.scale), wp.zero_point, axis)
                self.stats.add("weight_scales_raised_for_bias")
        self._checked(wp, f"weight of {node.op_type} {node.name!r}")
        codes = (lambda: qm.quantize_weight(w, wp, seven_bits))
        self._replace_input(node, index, codes() if key is None else self.memo.codes(key, wp.scale, codes), wp, "w")
        self.stats.add("weights_quantized")
        if bias is not None:
            bscale = qm.bias_scale(x_scale, self._per_output(wp.scale, bias.size))
            bp = qm.QParams(bscale, np.zeros(bscale.shape, np.int32), 0 if bscale.ndim else None)
            self._checked(bp, f"bias of {node.op_type} {node.name!r}")
            self._replace_input(node, 2, qm.quantize_bias(bias, bscale), bp, "b")
            self.stats.add("biases_quantized")

    def _bias_array(self, node: ir.Node) -> np.ndarray | None:
        if len(node.inputs) <= 2 or node.inputs[2] is None:
            return None
        b = const_array(node.inputs[2]).astype(np.float32)
        if node.op_type == "Gemm":
            n = self._gemm_n(node)
            beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
            b = np.broadcast_to(b.reshape(-1) * np.float32(beta), (n,)).astype(np.float32)
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return b.reshape(-1)

    def _gemm_n(self, node: ir.Node) -> int:
        w = const_array(node.inputs[1])
        trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        return int(w.shape[0] if trans_b else w.shape[1])

    def _per_output(self, w_scale: np.ndarray, n_out: int) -> np.ndarray:
        """Weight scales per output channel (ConvTranspose repeats its axis-1 scales per group)."""
        if w_scale.ndim == 0:
            return w_scale
        reps = n_out // w_scale.shape[0]
        return np.tile(w_scale, reps) if reps > 1 else w_scale

    def _const_input(self, node: ir.Node, index: int) -> None:
        c = const_array(node.inputs[index]).astype(np.float32)
        p = self._checked(
            qm.activation_params(float(c.min(initial=0.0)), float(c.max(initial=0.0)), self.opts.activations),
            f"constant input {index} of {node.op_type} {node.name!r}",
        )
        self._replace_input(node, index, qm.quantize_activation(c, p), p, "c")
        self.stats.add("constants_quantized")

    def _div_to_mul(self, node: ir.Node, index: int) -> None:
        """``x / c`` becomes ``x * (1 / c)`` (ORT has QLinearMul, no QLinearDiv)."""
        old = node.inputs[index]
        recip = (np.float32(1) / const_array(old).astype(np.float32)).astype(np.float32)
        node.op_type = "Mul"
        node.replace_input_with(index, add_initializer(self.graph, recip, self.names(f"{old.name or 'c'}_recip")))
        self.dead.append(old)
        self.stats.add("divisions_to_multiplications")

    def _replace_input(self, node, index, qvalues: np.ndarray, p: qm.QParams, tag: str) -> None:
        old = node.inputs[index]
        base = old.name or f"{node.name}_{index}"
        key = None
        if len(old.uses()) > 1 or id(old) in self.shared:  # several readers: one DequantizeLinear per encoding
            self.shared.add(id(old))
            key = (id(old), tag, qvalues.tobytes(), np.asarray(p.scale).tobytes(), p.axis)
        dq_out = self.weight_cache.get(key) if key is not None else None
        if dq_out is None:
            q_init = add_initializer(self.graph, qvalues, self.names(f"{base}_{tag}q"))
            s_init = add_initializer(self.graph, np.asarray(p.scale), self.names(f"{base}_{tag}scale"))
            z_init = add_initializer(self.graph, np.asarray(p.zero_point), self.names(f"{base}_{tag}zp"))
            attrs = [ir.AttrInt64("axis", p.axis)] if p.axis is not None and p.scale.ndim else []
            dq = ir.Node("", "DequantizeLinear", [q_init, s_init, z_init], attributes=attrs,
                         name=self.names(f"{base}_{tag}dq"))
            dq_out = dq.outputs[0]
            dq_out.name = self.names(f"{base}_{tag}dq_out")
            dq_out.dtype = ir.DataType.FLOAT
            dq_out.shape = ir.Shape(qvalues.shape)
            self.graph.insert_before(node, dq)
            if key is not None:
                self.weight_cache[key] = dq_out
            self.stats.add("qdq_inserted")
        node.replace_input_with(index, dq_out)
        self.dead.append(old)

    # ------------------------------------------------------------ activations

    def _insert_qdq(self, v: ir.Value) -> None:
        p = self.params[v]
        producer = v.producer()
        fused_output = producer is not None and producer in self.quantized
        uses = [u for u in v.uses() if fused_output or u.node in self.quantized]
        q = self._q_node(v, p)
        last = q
        for use in uses:
            dq = self._dq_node(q.outputs[0], p, v)
            self.graph.insert_after(last, dq)
            last = dq
            use.node.replace_input_with(use.idx, dq.outputs[0])
        if fused_output and v.is_graph_output():
            dq = self._dq_node(q.outputs[0], p, v)
            self.graph.insert_after(last, dq)
            self._take_output(v, dq.outputs[0])

    def _q_node(self, v: ir.Value, p: qm.QParams) -> ir.Node:
        base = v.name or "t"
        q = ir.Node("", "QuantizeLinear", [v, *self._scale_zp(v, p)], name=self.names(f"{base}_q"))
        out = q.outputs[0]
        out.name = self.names(f"{base}_quantized")
        out.dtype = ir.DataType.UINT8 if p.dtype == np.uint8 else ir.DataType.INT8
        out.shape = v.shape
        producer = v.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, q)
        else:
            self.graph.insert_before(self.graph[0], q)
        self.stats.add("qdq_inserted")
        return q

    def _dq_node(self, qv: ir.Value, p: qm.QParams, v: ir.Value) -> ir.Node:
        base = v.name or "t"
        dq = ir.Node("", "DequantizeLinear", [qv, *self._scale_zp(v, p)], name=self.names(f"{base}_dq"))
        out = dq.outputs[0]
        out.name = self.names(f"{base}_dequantized")
        out.dtype = ir.DataType.FLOAT
        out.shape = v.shape
        self.stats.add("qdq_inserted")
        return dq

    def _scale_zp(self, v: ir.Value, p: qm.QParams) -> tuple[ir.Value, ir.Value]:
        key = ("act", np.asarray(p.scale).tobytes(), np.asarray(p.zero_point).tobytes())
        pair = self.weight_cache.get(key)
        if pair is None:
            base = v.name or "t"
            pair = (
                add_initializer(self.graph, np.asarray(p.scale), self.names(f"{base}_scale")),
                add_initializer(self.graph, np.asarray(p.zero_point), self.names(f"{base}_zero_point")),
            )
            self.weight_cache[key] = pair
        return pair

    def _take_output(self, v: ir.Value, new: ir.Value) -> None:
        """``new`` replaces ``v`` among the graph outputs, under ``v``'s name."""
        name = v.name
        outputs = self.graph.outputs
        for i, out in enumerate(outputs):
            if out is v:
                outputs[i] = new
        v.name = self.names(f"{name}_float")
        new.name = name

    def _drop_dead(self) -> None:
        for v in self.dead:
            if v.uses() or v.is_graph_output() or v.is_graph_input():
                continue
            if v.is_initializer() and v.name in self.graph.initializers:
                self.graph.initializers.pop(v.name)
            elif v.producer() is not None and v.producer().op_type == "Constant":
                v.producer().graph.remove(v.producer(), safe=True)


def _back_to_weight(fitted: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """Per-output-channel scales folded back onto the weight's axis (max over ConvTranspose groups)."""
    if w_scale.ndim == 0 or fitted.shape == w_scale.shape:
        return np.asarray(fitted, np.float32).reshape(w_scale.shape)
    return fitted.reshape(-1, w_scale.shape[0]).max(axis=0).astype(np.float32)
