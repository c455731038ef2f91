"""Where Q/DQ go: the per-op placement rules for ONNX Runtime's CPU EP, the plan types, and ``plan_qdq``.

``RULES`` says, for each op type, what ONNX Runtime's QDQ transformer (``qdq_selector_action_transformer.cc``)
makes of ``DQ -> op -> Q`` on the CPU EP. Its kinds:

- ``COMPUTE`` (Conv, Gemm, MatMul): int8 weights (per channel), Q/DQ on the activation inputs; the output
  is quantized for QLinearConv / QLinearMatMul, and may stay float for QGemm and MatMulIntegerToFloat
  (then it is, unless a quantized op reads it). ConvTranspose is not fused on the CPU EP: by default
  only its weight is stored as int8 (``conv_transpose="weights"``); ``"qdq"`` quantizes it fully for EPs
  that fuse it.
- ``BINARY`` (Add, Mul -> QLinearAdd/QLinearMul; Div by a constant becomes Mul by its reciprocal, so
  that decomposed hard-swish ``x * clip(x + 3, 0, 6) / 6`` stays int8), ``UNARY`` (AveragePool, GlobalAveragePool, Sigmoid,
  LeakyRelu -> QLinear*), ``CONCAT`` (QLinearConcat; its inputs and output share one scale).
- ``PASS``: ops that only move or select values (MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze,
  Slice, Gather on data, Split, Expand, Tile, Resize in nearest mode). ORT drops the DQ/Q around them when
  scales match, so the output shares the input's scale and they run on int8.
- ``FOLD`` (Relu, Clip with constant bounds): removed when it directly follows a quantized op whose output
  is quantized anyway; the output range is clipped to the bounds and Q saturates exactly like the op.

Ops not in the table (Softmax, LayerNormalization, HardSwish, HardSigmoid, Erf, Div, Pow, ...) stay float,
and the planner keeps their neighbours float too when quantizing them would only add Q/DQ (see
``_qdq_planner``). A node a rule refuses is reported with the reason.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import const_array, is_default_domain

FLOAT = ir.DataType.FLOAT


class Kind(enum.Enum):
    COMPUTE = "compute"
    BINARY = "binary"
    UNARY = "unary"
    CONCAT = "concat"
    PASS = "pass"
    FOLD = "fold"


@dataclasses.dataclass(frozen=True)
class OpRule:
    """How one op type is quantized. ``check(node)`` returns why a node cannot be, or None."""

    kind: Kind
    fused_as: str
    check: Callable[[ir.Node], str | None]
    float_output_ok: bool = False


# ---------------------------------------------------------------- per-op checks


def _float_data(node: ir.Node, indices) -> str | None:
    for i in indices:
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None:
            return f"input {i} is missing"
        if const_array(v) is None and v.dtype != FLOAT:
            kind = "unknown (run shape inference)" if v.dtype is None else str(v.dtype)
            return f"input {i} {v.name!r} has element type {kind}, not float32"
    return None


def _const_weight(node: ir.Node, index: int, min_rank: int = 2) -> str | None:
    w = const_array(node.inputs[index]) if len(node.inputs) > index else None
    if w is None or w.dtype != np.float32:
        return f"weight input {index} is not a float32 constant"
    if w.ndim < min_rank:
        return f"weight input {index} has rank {w.ndim}"
    if not np.all(np.isfinite(w)):
        return f"weight input {index} holds NaN or Inf"
    return None


def _const_bias(node: ir.Node, index: int, size: int) -> str | None:
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    b = const_array(node.inputs[index])
    if b is None or b.dtype != np.float32:
        return "the bias is not a float32 constant"
    if b.size not in (1, size) or (b.size == size and max(b.shape, default=1) != size):
        return f"the bias of shape {list(b.shape)} is not one value per output channel ({size})"
    return None


def _check_conv(node: ir.Node) -> str | None:
    reason = _float_data(node, [0]) or _const_weight(node, 1, 3)
    if reason:
        return reason
    w = const_array(node.inputs[1])
    if node.op_type == "ConvTranspose":
        group = node.attributes["group"].as_int() if "group" in node.attributes else 1
        return _const_bias(node, 2, w.shape[1] * group)
    return _const_bias(node, 2, w.shape[0])


def _check_gemm(node: ir.Node) -> str | None:
    reason = _float_data(node, [0]) or _const_weight(node, 1, 2)
    if reason:
        return reason
    w = const_array(node.inputs[1])
    trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
    return _const_bias(node, 2, w.shape[0] if trans_b else w.shape[1])


def _check_matmul(node: ir.Node) -> str | None:
    if const_array(node.inputs[0]) is not None:
        return "its first operand is constant (only a constant second operand is quantized as a weight)"
    if const_array(node.inputs[1]) is not None:
        return _float_data(node, [0]) or _const_weight(node, 1, 1)
    return _float_data(node, [0, 1])


def _check_binary(node: ir.Node) -> str | None:
    if all(const_array(v) is not None for v in node.inputs):
        return "both inputs are constant (constant folding's job)"
    return _float_data(node, [0, 1])


def _check_div(node: ir.Node) -> str | None:
    d = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if d is None or const_array(node.inputs[0]) is not None:
        return "only a division of a tensor by a constant runs quantized (as QLinearMul)"
    if d.dtype != np.float32 or not np.all(np.isfinite(d)) or np.any(d == 0) or not np.all(np.isfinite(1 / d)):
        return "the divisor holds zeros or values whose reciprocal is not finite"
    return _float_data(node, [0])


def _check_unary(node: ir.Node) -> str | None:
    return _float_data(node, [0])


def _check_concat(node: ir.Node) -> str | None:
    if any(v is None for v in node.inputs) or not node.inputs:
        return "it has a missing input"
    return _float_data(node, range(len(node.inputs)))


def _check_pass(node: ir.Node) -> str | None:
    if const_array(node.inputs[0]) is not None:
        return "its data input is constant"
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
        return "its Indices output is used"
    if node.op_type == "Resize":
        mode = node.attributes["mode"].as_string() if "mode" in node.attributes else "nearest"
        if mode != "nearest":
            return f"Resize mode {mode!r} interpolates (only 'nearest' keeps the scale)"
    return _float_data(node, [0])


def _check_fold(node: ir.Node) -> str | None:
    if node.op_type == "Clip":
        for i in (1, 2):
            v = node.inputs[i] if len(node.inputs) > i else None
            if v is not None and (const_array(v) is None or const_array(v).size != 1):
                return f"Clip bound input {i} is not a constant scalar"
    return _float_data(node, [0])


_PASS_OPS = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
             "GatherElements", "Split", "Expand", "Tile", "Resize")

#: The placement rules, one explicit entry per op type (default ONNX domain only).
RULES: dict[str, OpRule] = {
    "Conv": OpRule(Kind.COMPUTE, "QLinearConv", _check_conv),
    "ConvTranspose": OpRule(Kind.COMPUTE, "(not fused on CPU)", _check_conv),
    "Gemm": OpRule(Kind.COMPUTE, "QGemm", _check_gemm, float_output_ok=True),
    "MatMul": OpRule(Kind.COMPUTE, "QLinearMatMul/MatMulIntegerToFloat", _check_matmul, float_output_ok=True),
    "Add": OpRule(Kind.BINARY, "QLinearAdd", _check_binary),
    "Mul": OpRule(Kind.BINARY, "QLinearMul", _check_binary),
    "Div": OpRule(Kind.BINARY, "QLinearMul (multiplied by the reciprocal)", _check_div),
    "AveragePool": OpRule(Kind.UNARY, "QLinearAveragePool", _check_unary),
    "GlobalAveragePool": OpRule(Kind.UNARY, "QLinearGlobalAveragePool", _check_unary),
    "Sigmoid": OpRule(Kind.UNARY, "QLinearSigmoid", _check_unary),
    "LeakyRelu": OpRule(Kind.UNARY, "QLinearLeakyRelu", _check_unary),
    "Concat": OpRule(Kind.CONCAT, "QLinearConcat", _check_concat),
    **{op: OpRule(Kind.PASS, f"{op} on int8", _check_pass) for op in _PASS_OPS},
    "Relu": OpRule(Kind.FOLD, "folded into the producer's range", _check_fold),
    "Clip": OpRule(Kind.FOLD, "folded into the producer's range", _check_fold),
}


def rule_for(node: ir.Node) -> OpRule | None:
    return RULES.get(node.op_type) if is_default_domain(node) else None


def data_inputs(node: ir.Node, rule: OpRule) -> list[int]:
    """Indices of the inputs that carry quantized activations (constants of BINARY ops included)."""
    if rule.kind is Kind.COMPUTE:
        second = node.op_type == "MatMul" and const_array(node.inputs[1]) is None
        return [0, 1] if second else [0]
    if rule.kind is Kind.BINARY:
        return [0, 1]
    if rule.kind is Kind.CONCAT:
        return list(range(len(node.inputs)))
    return [0]


def weight_axis(node: ir.Node, w: np.ndarray, per_channel: bool) -> int | None:
    """Channel axis of the weight of a COMPUTE node, or None for one scale per tensor."""
    if not per_channel:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        return 0 if trans_b else 1
    return 1 if w.ndim == 2 else None  # MatMul: per column of a 2-D B


_ELEMENTWISE = ("Add", "Mul", "Div", "Sigmoid", "LeakyRelu")


def speed_knob_reason(node: ir.Node, options: PlanOptions) -> str | None:
    """Why a node stays float under the speed knobs of ``PlanOptions``, or None."""
    if node.op_type == "MatMul" and not options.matmul_activations and const_array(node.inputs[1]) is None:
        return "MatMul of two activations kept float (matmul_activations=False)"
    if not options.pools and node.op_type in ("MaxPool", "AveragePool"):
        return "pooling kept float (pools=False)"
    if not options.elementwise and node.op_type in _ELEMENTWISE:
        return "elementwise op kept float (elementwise=False)"
    if node.op_type != "Conv":
        return None
    w = const_array(node.inputs[1])
    if not options.depthwise and is_depthwise(node):
        return "depthwise conv kept float (depthwise=False)"
    macs = int(np.prod(w.shape[1:]))
    if macs < options.min_conv_macs:
        return f"{macs} MACs per output element < min_conv_macs={options.min_conv_macs}"
    return None


def is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input channel per group and more than one group."""
    w = node.inputs[1].shape if len(node.inputs) > 1 and node.inputs[1] is not None else None
    group = node.attributes["group"].as_int() if "group" in node.attributes else 1
    return node.op_type == "Conv" and group > 1 and w is not None and len(w) > 1 and w[1] == 1


def clip_bounds(node: ir.Node) -> tuple[float, float]:
    """The interval a Relu or Clip node maps onto."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    hi = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return (float(lo.reshape(-1)[0]) if lo is not None else float("-inf"),
            float(hi.reshape(-1)[0]) if hi is not None else float("inf"))


# ---------------------------------------------------------------- options and plan


#: Ops only ``dynamic_quantize`` makes int8 (``exclude_ops`` keeps them float there too).
DYNAMIC_ONLY_OPS = ("LSTM",)


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """What to quantize and how. Validated on creation (``ConfigError``)."""

    activations: str = "uint8"  # "uint8" (asymmetric) or "int8" (symmetric)
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights ([-64, 64]) for every layer
    # 7-bit weights for these op types only: those whose int8 kernels saturate 8-bit weights on the machine
    # (onnxshrink.ort_int8; "MatMulInteger" stands for linear layers the tuner runs dynamic)
    reduce_range_ops: tuple[str, ...] = ()
    # narrowed static Conv/MatMul/Gemm weights are pair-safe (_qdq_math.pair_safe_scale: up to 8 bits, no
    # two neighbours in the kernel's K order past 128) instead of 7-bit. Neither wins on every model
    # (benchmarks/results/pair_safe_avx2.md), so quantize(pair_safe=None) lets calib_select choose by drift.
    # Dynamic layers are always pair-safe (dynamic_weights_avx2.md: 1.3-17x less drift than 7-bit).
    pair_safe: bool = False
    exclude: tuple[str, ...] = ()  # node-name patterns: fnmatch, or "re:REGEX"
    exclude_ops: tuple[str, ...] = ()
    keep_first: int = 0  # leave the first N quantizable compute layers float
    keep_last: int = 0
    conv_transpose: str = "weights"  # "weights" (int8 weight only), "qdq" (full), "float"
    mask_magnitude: float = 1e4  # inputs this large (and 100x their sibling) are masks: kept float
    depthwise: bool = True  # quantize depthwise convs (ORT's x86 int8 depthwise kernels can be slower)
    # with depthwise=False: False also keeps the input of each depthwise conv float, with the elementwise
    # ops computing it (e.g. a written-out hard-swish) back to the previous compute layer (see _qdq_planner)
    depthwise_inputs: bool = True
    min_conv_macs: int = 0  # convs with fewer MACs per output element (C_in/group * kernel) stay float
    matmul_activations: bool = True  # quantize MatMuls of two activations (attention scores, context)
    pools: bool = True  # MaxPool / AveragePool on int8 (fast in ORT's NHWC conv chains, slow alone)
    elementwise: bool = True  # Add, Mul, Div, Sigmoid, LeakyRelu on int8

    def __post_init__(self) -> None:
        if self.activations not in ("uint8", "int8"):
            raise ConfigError(f"activations must be 'uint8' or 'int8', not {self.activations!r}")
        if self.conv_transpose not in ("weights", "qdq", "float"):
            raise ConfigError(f"conv_transpose must be 'weights', 'qdq' or 'float', not {self.conv_transpose!r}")
        if isinstance(self.reduce_range_ops, str) or not all(isinstance(o, str) for o in self.reduce_range_ops):
            raise ConfigError(f"reduce_range_ops must be a tuple of op types, not {self.reduce_range_ops!r}")
        object.__setattr__(self, "reduce_range_ops", tuple(self.reduce_range_ops))
        if self.keep_first < 0 or self.keep_last < 0 or self.min_conv_macs < 0:
            raise ConfigError("keep_first / keep_last / min_conv_macs must be >= 0")
        unknown = [op for op in self.exclude_ops if op not in RULES and op not in DYNAMIC_ONLY_OPS]
        if unknown:
            raise ConfigError(f"exclude_ops {unknown} are never quantized; quantizable ops: {sorted(RULES)}")
        for pat in self.exclude:
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise ConfigError(f"exclude pattern {pat!r} is not a valid regex: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def narrow(self, op_type: str) -> bool:
        """Whether ``op_type``'s weights are quantized to 7 bits."""
        return self.reduce_range or op_type in self.reduce_range_ops


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """A constant weight input stored as int8 + DequantizeLinear."""

    node: ir.Node
    index: int
    axis: int | None


@dataclasses.dataclass(frozen=True)
class BiasSpec:
    """A constant bias stored as int32 with scale = scale of ``activation`` x weight scale."""

    node: ir.Node
    index: int
    activation: ir.Value


@dataclasses.dataclass(frozen=True)
class GraphPlan:
    """Everything the QDQ pass changes in one graph (main graph or subgraph)."""

    graph: ir.Graph
    nodes: tuple[ir.Node, ...]  # quantized node units, in graph order
    tensors: tuple[ir.Value, ...]  # activations that get QuantizeLinear -> DequantizeLinear
    groups: tuple[tuple[ir.Value, ...], ...]  # shared-scale groups over ``tensors`` (singletons too)
    folds: tuple[ir.Node, ...]  # Relu/Clip nodes removed, their bounds in ``clips``
    clips: Mapping[ir.Value, tuple[float, float]]
    weights: tuple[WeightSpec, ...]
    biases: tuple[BiasSpec, ...]
    consts: tuple[tuple[ir.Node, int], ...]  # constant inputs of quantized Add/Mul (per-tensor, activation type)
    ranges: Mapping[ir.Value, tuple[float, float]]  # group range per tensor (final plans only)


@dataclasses.dataclass(frozen=True)
class QDQPlan:
    """The placement for a whole model; ``ranges`` were known (final) or not (preliminary)."""

    options: PlanOptions
    graphs: tuple[GraphPlan, ...]
    skipped: tuple[tuple[ir.Node, str], ...]
    final: bool

    @property
    def nodes(self) -> list[ir.Node]:
        return [n for g in self.graphs for n in g.nodes]

    def calibration_tensors(self) -> list[str]:
        """Names of the activations whose ranges the plan needs, in graph order, without repeats."""
        seen: dict[str, None] = {}
        for g in self.graphs:
            # A folded Relu/Clip's own output too: the final plan undoes a fold the ranges refute.
            for v in [*g.tensors, *(r.outputs[0] for r in g.folds)]:
                if v.name:
                    seen.setdefault(v.name, None)
        return list(seen)

    def calibration_values(self) -> list[ir.Value]:
        """The values behind ``calibration_tensors``, for ``calibration.calibrate(model, data, values)``."""
        seen: dict[ir.Value, None] = {}
        for g in self.graphs:
            for v in [*g.tensors, *(r.outputs[0] for r in g.folds)]:
                seen.setdefault(v, None)
        return list(seen)

    def summary(self) -> dict:
        ops: dict[str, int] = {}
        for n in self.nodes:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        return {
            "quantized_nodes": len(self.nodes),
            "quantized_ops": dict(sorted(ops.items())),
            "tensors": sum(len(g.tensors) for g in self.graphs),
            "weights": sum(len(g.weights) for g in self.graphs),
            "relus_folded": sum(len(g.folds) for g in self.graphs),
            "kept_float": len(self.skipped),
        }


def plan_qdq(model: ir.Model, options: PlanOptions | None = None, ranges=None) -> QDQPlan:
    """Plan the QDQ placement of ``model`` (pure: the model is not changed).

    Without ``ranges`` the plan is preliminary: it names the tensors to calibrate. With ``ranges``
    (a calibration table: ``name in ranges``, ``ranges[name].min/.max``) it is final: tensors without a
    usable range, mask-like tensors and what depends on them are kept float, and each shared-scale
    group gets its range.
    """
    from onnxshrink.passes import _qdq_planner

    return _qdq_planner.plan_model(model, options or PlanOptions(), ranges)
