"""Fusions that fold a following affine op into the weights or bias of a Conv, ConvTranspose or Gemm.

``fuse_batchnorm``: ``BatchNormalization(P(x))`` -> ``P'(x)`` for P a Conv, ConvTranspose (weight layout
[Cin, Cout/group, ...]), Gemm, or MatMul (becomes a Gemm). With s = scale / sqrt(var + eps) and
t = B - mean * s, the output-channel slices of the weight are scaled by s and the bias becomes
bias * s + t. Refused when BN is in training mode (or ``spatial=0``), uses more than output 0, has
non-constant parameters, when P's output has another user, P's weight (or bias) is not a constant
(a graph input is not), or BN's channel axis (1) is not P's output-feature axis (MatMul with a
non-2-D input).

``fuse_conv_bias``: ``Conv(x) + c`` (also ``c + Conv(x)``, ``Conv(x) - c``) -> Conv with bias, when c is a
constant that is uniform or varies only along the channel axis of the output ([C,1,1], [1,C,1,1],
...; a [C] constant lines up with the last spatial axis, so it fuses only when uniform) and does not
broadcast the output bigger. The Conv's weight need not be constant, only its shape known.
With ``scale`` (on): ``Conv(x) * c`` (also ``c * Conv(x)``, ``Conv(x) / c``) -> Conv with weight and bias
scaled per output channel by c (1/c), for the same per-channel constants, floating point only; refused
when the weight or bias is not a constant, a divisor is zero, or the scale is not finite. (onnxsim
folds these too; ``benchmarks/bench_fusions_ort.py`` measures the result on ORT.)

``fuse_gemm``: ``MatMul(A, B) + C`` -> ``Gemm(A, B, C)`` when A is 2-D, B a constant 2-D, the MatMul output
feeds only the Add, and C broadcasts unidirectionally to [M, N] (``matmul_add`` option); and
``Gemm(A, B[, C]) + c`` -> ``Gemm(A, B, beta*C + c)`` for a constant c (``gemm_add`` option).
Float types only (the types Gemm and ORT's CPU kernels take). On by default: ``benchmarks/bench_fuse_gemm.py``
measured Gemm / (MatMul + Add) latency ratios of 0.95-1.02 (float32 and float16, ORT 1.32 CPU, 1 thread).

Fused weights are computed in float64 and cast back to the weight dtype (float32, float16, ...), stored
in new initializers with fresh names (shared weights are never mutated); the old ones are left for
``dead_code``. Graph outputs keep their names, types and shapes (``graph_utils.bypass``).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxshrink.passes import _shape_info
from onnxshrink.passes._fusion_base import (
    FLOAT_TYPES,
    Rewriter,
    candidates,
    dtype_of,
    f64,
    input_at,
    producer_of,
    run,
    set_input,
    sole_user,
)

from onnxshrink.graph_utils import const_array, const_shape
from onnxshrink.pass_infra import Changes, NoConfig, PassStats, ShrinkPass

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- fuse_batchnorm


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """BN as y = x * s + t along axis 1, or the reason it cannot be folded."""
    if bn.attributes.get_int("training_mode", 0) != 0:
        return "BatchNormalization is in training mode"
    if bn.attributes.get_int("spatial", 1) == 0 or bn.attributes.get_int("is_test", 1) == 0:
        return "BatchNormalization is not in spatial inference mode"
    if any(_used_value(v) for v in bn.outputs[1:]):
        return "BatchNormalization's running statistics outputs are used"
    params = [const_array(input_at(bn, i)) for i in range(1, 5)]
    if any(p is None or p.ndim != 1 for p in params):
        return "BatchNormalization's scale, bias, mean or var is not a constant vector (or is a graph input)"
    scale, bias, mean, var = (f64(p) for p in params)
    s = scale / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    return s, bias - mean * s


def _used_value(v: ir.Value) -> bool:
    return bool(v.uses()) or v.is_graph_output()


def _fold_weights(producer: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray | str:
    """``w`` with its output-channel slices scaled by ``s``, or why the layout does not match."""
    op, c = producer.op_type, len(s)
    if op == "Conv":
        if w.ndim < 3 or w.shape[0] != c:
            return f"Conv weight shape {w.shape} does not have {c} output channels"
        return f64(w) * s.reshape((c,) + (1,) * (w.ndim - 1))
    if op == "ConvTranspose":
        group = producer.attributes.get_int("group", 1)
        if w.ndim < 3 or w.shape[1] * group != c or w.shape[0] % group:
            return f"ConvTranspose weight shape {w.shape} (group {group}) does not have {c} output channels"
        grouped = f64(w).reshape((group, w.shape[0] // group, w.shape[1]) + w.shape[2:])
        scale = s.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        return (grouped * scale).reshape(w.shape)
    axis = 0 if producer.op_type == "Gemm" and producer.attributes.get_int("transB", 0) else 1
    if w.ndim != 2 or w.shape[axis] != c:
        return f"{op} weight shape {w.shape} does not have {c} output features"
    return f64(w) * (s if axis == 1 else s[:, None])


def _try_batchnorm(rw: Rewriter, bn: ir.Node) -> bool:
    producer = producer_of(bn.inputs[0], ("Conv", "ConvTranspose", "Gemm", "MatMul"), bn)
    if producer is None:
        return False
    plan = _batchnorm_plan(producer, bn)
    if isinstance(plan, str):
        rw.stats.skip(bn, plan)
        return False
    new_w, new_b, dtype = plan
    if producer.op_type == "MatMul":
        w_value, b_value = rw.const(new_w, dtype, "bn_fused_weight"), rw.const(new_b, dtype, "bn_fused_bias")
        gemm = rw.new_node("Gemm", [producer.inputs[0], w_value, b_value], bn)
        return rw.replace(bn, gemm.outputs[0], "batchnorms_fused", dead=producer)
    # Rewire first: the producer is only changed once the BN is gone.
    if not rw.replace(bn, producer.outputs[0], "batchnorms_fused"):
        return False
    producer.attributes.pop("beta", None)  # Gemm: beta is folded into the new C
    set_input(producer, 1, rw.const(new_w, dtype, "bn_fused_weight"))
    set_input(producer, 2, rw.const(new_b, dtype, "bn_fused_bias"))
    return True


def _batchnorm_plan(producer: ir.Node, bn: ir.Node) -> tuple[np.ndarray, np.ndarray, np.dtype] | str:
    """(fused weight, fused bias, weight dtype), or the reason BN cannot be folded into ``producer``."""
    affine = _bn_affine(bn)
    if isinstance(affine, str):
        return affine
    reason = _batchnorm_blocker(producer, bn)
    if reason:
        return reason
    weight = const_array(input_at(producer, 1))
    bias_in = input_at(producer, 2)
    bias = const_array(bias_in) if bias_in is not None else None
    if weight is None or (bias_in is not None and bias is None):
        return f"{producer.op_type}'s weight or bias is not a constant (or is a graph input)"
    s, t = affine
    new_w = _fold_weights(producer, weight, s)
    if isinstance(new_w, str):
        return new_w
    if bias is None:
        return new_w, t, weight.dtype
    beta = producer.attributes.get_float("beta", 1.0) if producer.op_type == "Gemm" else 1.0
    return new_w, beta * f64(bias) * s + t, weight.dtype


def _batchnorm_blocker(producer: ir.Node, bn: ir.Node) -> str | None:
    if not sole_user(producer.outputs[0], bn):
        return f"the {producer.op_type} output has other users or is a graph output"
    if producer.op_type == "MatMul":
        a = producer.inputs[0]
        if a is None or a.shape is None or len(a.shape) != 2:
            return ("BN normalizes axis 1; it is the MatMul's output-feature axis only for a 2-D "
                    "input, and this input's rank is not statically 2")
    return None


class FuseBatchNormPass(ShrinkPass):
    """Fold inference-mode BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul."""

    name = "fuse_batchnorm"
    Config = NoConfig
    changes = Changes.TOPOLOGY | Changes.WEIGHTS

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        _shape_info.fill_missing(model, candidates(model, "BatchNormalization", ("MatMul",)))
        run(model, stats, ("BatchNormalization",), _try_batchnorm)


# ---------------------------------------------------------------- fuse_conv_bias


def _channel_vector(c: np.ndarray, channels: int, rank: int) -> np.ndarray | str:
    """A constant added to a [N, C, ...] output as a per-channel [C] vector, or why it is not one."""
    if c.ndim > rank:
        return f"the constant's rank {c.ndim} exceeds the Conv output's rank {rank}"
    padded = c.reshape((1,) * (rank - c.ndim) + c.shape)
    bad = [i for i, d in enumerate(padded.shape) if d != 1 and not (i == 1 and d == channels)]
    if bad:
        return (f"the constant of shape {c.shape} varies (or broadcasts) over output axes {bad}, "
                "not only over the channel axis 1")
    return np.broadcast_to(f64(padded.reshape(padded.shape[1])), (channels,))


def _conv_channels(conv: ir.Node) -> tuple[int, int] | None:
    """(output channels, output rank) of a Conv/ConvTranspose from its weight's static shape."""
    w = input_at(conv, 1)
    const = const_array(w)
    dims = list(const.shape) if const is not None else None if w is None or w.shape is None else list(w.shape)
    if dims is None or len(dims) < 3 or not all(isinstance(d, int) for d in dims[:2]):
        return None
    if conv.op_type == "Conv":
        return dims[0], len(dims)
    return dims[1] * conv.attributes.get_int("group", 1), len(dims)


def _try_conv_bias(rw: Rewriter, add: ir.Node) -> bool:
    for xi in (0, 1) if add.op_type == "Add" else (0,):
        conv = producer_of(add.inputs[xi], ("Conv", "ConvTranspose"), add)
        c = const_array(add.inputs[1 - xi])
        if conv is None or c is None:
            continue
        if not sole_user(conv.outputs[0], add):
            rw.stats.skip(add, f"the {conv.op_type} output has other users or is a graph output")
            return False
        shape = _conv_channels(conv)
        bias_in = input_at(conv, 2)
        bias = const_array(bias_in) if bias_in is not None else None
        if shape is None or (bias_in is not None and bias is None):
            rw.stats.skip(add, f"the {conv.op_type} weight shape is unknown or its bias is not constant")
            return False
        vec = _channel_vector(c, *shape)
        if isinstance(vec, str):
            rw.stats.skip(add, vec)
            return False
        sign = 1.0 if add.op_type == "Add" else -1.0
        new_b = (0.0 if bias is None else f64(bias)) + sign * vec
        if not rw.replace(add, conv.outputs[0], "conv_biases_fused"):
            return False
        set_input(conv, 2, rw.const(new_b, c.dtype, "conv_fused_bias"))
        return True
    return False


def _try_conv_scale(rw: Rewriter, mul: ir.Node) -> bool:
    for xi in (0, 1) if mul.op_type == "Mul" else (0,):
        conv = producer_of(mul.inputs[xi], ("Conv", "ConvTranspose"), mul)
        c = const_array(mul.inputs[1 - xi])
        if conv is None or c is None:
            continue
        if not sole_user(conv.outputs[0], mul):
            rw.stats.skip(mul, f"the {conv.op_type} output has other users or is a graph output")
            return False
        plan = _scale_plan(conv, c, mul.op_type == "Div")
        if isinstance(plan, str):
            rw.stats.skip(mul, plan)
            return False
        (new_w, w_dtype), bias = plan
        if not rw.replace(mul, conv.outputs[0], "conv_scales_fused"):
            return False
        set_input(conv, 1, rw.const(new_w, w_dtype, "conv_scaled_weight"))
        if bias is not None:
            set_input(conv, 2, rw.const(bias[0], bias[1], "conv_scaled_bias"))
        return True
    return False


def _scale_plan(conv: ir.Node, c: np.ndarray, divide: bool) -> tuple | str:
    """((new weight, dtype), (new bias, dtype) or None) for ``conv`` times (or divided by) ``c``."""
    shape = _conv_channels(conv)
    w = const_array(input_at(conv, 1))
    bias_in = input_at(conv, 2)
    bias = const_array(bias_in) if bias_in is not None else None
    if shape is None or w is None or (bias_in is not None and bias is None):
        return f"the {conv.op_type}'s weight (or bias) is not a constant (or is a graph input)"
    if c.dtype.kind != "f" or w.dtype.kind != "f":
        return "only floating-point scales fold into weights"
    vec = _channel_vector(c, *shape)
    if isinstance(vec, str):
        return vec
    if divide and not np.all(vec != 0):
        return "the divisor has zeros"
    vec = 1.0 / vec if divide else vec
    if not np.all(np.isfinite(vec)):
        return "the scale is not finite"
    new_w = _fold_weights(conv, w, vec)
    if isinstance(new_w, str):
        return new_w
    return (new_w, w.dtype), (None if bias is None else (f64(bias) * vec, bias.dtype))


@dataclasses.dataclass(frozen=True)
class FuseConvBiasConfig:
    #: Also fold a per-channel constant Mul/Div into the weight and bias.
    scale: bool = True


class FuseConvBiasPass(ShrinkPass):
    """Fold a per-channel constant Add/Sub after a Conv/ConvTranspose into its bias, and a Mul/Div into
    its weight and bias."""

    name = "fuse_conv_bias"
    Config = FuseConvBiasConfig
    changes = Changes.TOPOLOGY | Changes.WEIGHTS

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        def try_node(rw: Rewriter, node: ir.Node) -> bool:
            if node.op_type in ("Add", "Sub"):
                return _try_conv_bias(rw, node)
            return self.config.scale and _try_conv_scale(rw, node)

        run(model, stats, ("Add", "Sub", "Mul", "Div"), try_node)


# ---------------------------------------------------------------- fuse_gemm


def _unidirectional(c_dims: list, m, n) -> bool:
    """Whether a C of dims ``c_dims`` broadcasts to [m, n] without growing it."""
    if len(c_dims) > 2:
        return False
    padded = [1] * (2 - len(c_dims)) + list(c_dims)
    return all(d == 1 or _same(d, want) for d, want in zip(padded, (m, n)))


def _same(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _try_matmul_add(rw: Rewriter, add: ir.Node) -> bool:
    for xi in (0, 1):
        mm, c = producer_of(add.inputs[xi], ("MatMul",), add), add.inputs[1 - xi]
        if mm is None or c is None or c is add.inputs[xi]:
            continue
        a, b = mm.inputs[0], const_shape(mm.inputs[1])  # B's shape: its data is not read
        if not sole_user(add.inputs[xi], add):
            rw.stats.skip(add, "the MatMul output has other users or is a graph output")
            return False
        if a is None or a.shape is None or len(a.shape) != 2 or b is None or len(b) != 2:
            rw.stats.skip(add, "Gemm needs a 2-D MatMul input A and a constant 2-D B")
            return False
        if dtype_of(a) not in FLOAT_TYPES or dtype_of(c) != dtype_of(a):
            rw.stats.skip(add, f"dtypes {dtype_of(a)}, {dtype_of(c)}: unknown or not a float type Gemm takes")
            return False
        c_const = const_shape(c)
        c_dims = list(c.shape) if c.shape is not None else None
        c_dims = list(c_const) if c_const is not None else c_dims
        if c_dims is None or not _unidirectional(c_dims, a.shape[0], b[1]):
            rw.stats.skip(add, f"the addend (shape {c_dims}) does not broadcast to [M, N] of the MatMul")
            return False
        gemm = rw.new_node("Gemm", [a, mm.inputs[1], c], add)
        return rw.replace(add, gemm.outputs[0], "matmul_add_fused", dead=mm)
    return False


def _try_gemm_add(rw: Rewriter, add: ir.Node) -> bool:
    for xi in (0, 1):
        gemm, c = producer_of(add.inputs[xi], ("Gemm",), add), const_array(add.inputs[1 - xi])
        if gemm is None or c is None:
            continue
        if not sole_user(add.inputs[xi], add):
            rw.stats.skip(add, "the Gemm output has other users or is a graph output")
            return False
        old_in = input_at(gemm, 2)
        old = const_array(old_in) if old_in is not None else None
        dims = add.inputs[xi].shape
        if (old_in is not None and old is None) or dims is None or len(dims) != 2:
            rw.stats.skip(add, "the Gemm's C is not constant or its output shape is unknown")
            return False
        if not _unidirectional(list(c.shape), dims[0], dims[1]):
            rw.stats.skip(add, f"the constant of shape {c.shape} does not broadcast to the Gemm output")
            return False
        beta = gemm.attributes.get_float("beta", 1.0)
        new_c = f64(c) if old is None else beta * f64(old) + f64(c)
        if not _unidirectional(list(new_c.shape), dims[0], dims[1]):
            rw.stats.skip(add, "the merged C does not broadcast to the Gemm output")
            return False
        if not rw.replace(add, gemm.outputs[0], "gemm_add_fused"):
            return False
        set_input(gemm, 2, rw.const(new_c, c.dtype, "gemm_fused_c"))
        gemm.attributes.pop("beta", None)
        return True
    return False


@dataclasses.dataclass(frozen=True)
class FuseGemmConfig:
    #: MatMul(A, B) + C -> Gemm(A, B, C).
    matmul_add: bool = True
    #: Gemm(A, B[, C]) + c -> Gemm(A, B, C + c).
    gemm_add: bool = True


class FuseGemmPass(ShrinkPass):
    """Fuse MatMul + Add into Gemm, and a constant Add after a Gemm into its C."""

    name = "fuse_gemm"
    Config = FuseGemmConfig
    changes = Changes.TOPOLOGY | Changes.WEIGHTS

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        _shape_info.fill_missing(model, candidates(model, "Add", ("MatMul", "Gemm")))

        def try_add(rw: Rewriter, add: ir.Node) -> bool:
            return (self.config.matmul_add and _try_matmul_add(rw, add)) or (
                self.config.gemm_add and _try_gemm_add(rw, add)
            )

        run(model, stats, ("Add",), try_add)
