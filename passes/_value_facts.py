"""Facts about values that rules can prove when the model carries no ``value_info``.

Exported models (Paddle, older converters) often have no dtype or shape for intermediate values, and
onnx shape inference loses them after a data-dependent ``Reshape``. A rule that only needs a lower
bound on a value's rank, or its dtype, can often read it off the producer instead:

- ``known_dtype``: the value's dtype, a constant's, or the producer's (Shape/Size/ArgMax give int64,
  Cast its ``to``, ops whose output has their input's type that input's, recursively).
- ``min_rank``: a lower bound on the rank: the shape's length, a constant's ``ndim``, a Conv's weight
  rank (the output has the weight's rank), the input rank of shape-preserving ops, the largest bound
  of a broadcasting op's inputs (its output rank is the largest input rank).
- ``holds_all(a, b)``: every value of dtype ``a`` is exactly representable in dtype ``b`` (so a cast
  a -> b -> a returns its input).

The walks up the graph stop after ``_MAX_DEPTH`` producers; an unknown answer is None, never a guess.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import const_array, is_default_domain

_MAX_DEPTH = 32

#: Ops whose output has the shape and dtype of input 0.
SAME_SHAPE_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BatchNormalization", "Ceil", "Celu", "Clip",
    "Cos", "Cosh", "CumSum", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
    "Hardmax", "Identity", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu",
    "Log", "LogSoftmax", "LpNormalization", "LRN", "MeanVarianceNormalization", "Mish", "Neg", "Not",
    "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softmax",
    "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
})
#: Of those, the ones whose output dtype is not input 0's.
_BOOL_OUT = frozenset({"IsInf", "IsNaN"})
#: Ops whose output rank is the largest input rank (multidirectional broadcasting).
BROADCAST_OPS = frozenset({
    "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "Sub", "Sum",
    "Where", "Xor",
})
_SAME_TYPE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Mean", "Sum", "Mod"})
_COMPARE = frozenset({"And", "Or", "Xor", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"})
_CONV_LIKE = frozenset({"Conv", "ConvTranspose", "ConvInteger"})
_INT64_OUT = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})


def _producer(value: ir.Value | None) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and is_default_domain(node) else None


def known_dtype(value: ir.Value | None, depth: int = 0) -> ir.DataType | None:
    """The dtype of ``value`` as recorded, or as its producer proves it; None when unknown."""
    if value is None or depth > _MAX_DEPTH:
        return None
    if value.dtype is not None:
        return value.dtype
    arr = const_array(value)
    if arr is not None:
        try:
            return ir.DataType.from_numpy(arr.dtype)
        except Exception:  # noqa: BLE001 - dtypes onnx has no name for
            return None
    node = _producer(value)
    if node is None or value is not node.outputs[0]:
        return None
    op = node.op_type
    if op in _INT64_OUT:
        return ir.DataType.INT64
    if op in _BOOL_OUT or op in _COMPARE or op == "Not":
        return ir.DataType.BOOL
    if op == "Cast" and "to" in node.attributes:
        return ir.DataType(node.attributes["to"].as_int())
    if op in SAME_SHAPE_OPS or op in ("Conv", "ConvTranspose", "Pow") or op in _SAME_TYPE_BINARY:
        for v in node.inputs[:2] if op in _SAME_TYPE_BINARY or op.startswith("Conv") else node.inputs[:1]:
            dtype = known_dtype(v, depth + 1)
            if dtype is not None:
                return dtype
    return None


def min_rank(value: ir.Value | None, depth: int = 0) -> int | None:
    """A proven lower bound on the rank of ``value`` (its rank when known exactly), or None."""
    if value is None or depth > _MAX_DEPTH:
        return None
    if value.shape is not None:
        return len(value.shape)
    arr = const_array(value)
    if arr is not None:
        return arr.ndim
    node = _producer(value)
    if node is None or value is not node.outputs[0]:
        return None
    op = node.op_type
    if op in _CONV_LIKE and len(node.inputs) > 1:
        w = node.inputs[1]
        return _exact_rank(w)
    if op in SAME_SHAPE_OPS or op == "Cast":
        return min_rank(node.inputs[0], depth + 1) if node.inputs else None
    if op in BROADCAST_OPS:
        bounds = [min_rank(v, depth + 1) for v in node.inputs if v is not None]
        known = [b for b in bounds if b is not None]
        return max(known) if known else None
    return None


def _exact_rank(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    arr = const_array(value)
    if arr is not None:
        return arr.ndim
    return len(value.shape) if value.shape is not None else None


# ---------------------------------------------------------------- small helpers of the rules


def ints(value: ir.Value | None) -> list[int] | None:
    arr = const_array(value)
    if arr is None or arr.dtype.kind not in "iu" or arr.ndim > 1:
        return None
    return [int(v) for v in arr.reshape(-1)]


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def axes(node: ir.Node) -> list[int] | None:
    """The ``axes`` of a Squeeze/Unsqueeze/Slice: attribute (old opsets) or constant input 1."""
    if "axes" in node.attributes:
        return attr_ints(node, "axes")
    return ints(node.inputs[1]) if len(node.inputs) > 1 else None


def dims(value: ir.Value | None) -> list | None:
    return None if value is None or value.shape is None else list(value.shape)


def same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def broadcast_keeps(x_dims: list | None, c_shape) -> bool:
    """Whether broadcasting a tensor of shape ``c_shape`` onto ``x_dims`` leaves ``x_dims`` unchanged."""
    if x_dims is None or len(c_shape) > len(x_dims):
        return False
    aligned = x_dims[len(x_dims) - len(c_shape):]
    return all(c == 1 or same_dim(x, c) for x, c in zip(aligned, c_shape))


def reshape_keeps(x_dims: list | None, target: list[int], allowzero: bool) -> bool:
    if x_dims is None or len(target) != len(x_dims):
        return False
    free = [i for i, t in enumerate(target) if t == -1]
    if len(free) > 1 or any(d == 0 for d in x_dims):
        return False  # a -1 next to an empty dim is ambiguous
    return all(
        i in free or (t == 0 and not allowzero) or (isinstance(d, int) and d == t)
        for i, (d, t) in enumerate(zip(x_dims, target))
    )


def perm(node: ir.Node, rank: int | None) -> list[int] | None:
    perm = attr_ints(node, "perm")
    if perm is None and rank is not None:
        perm = list(reversed(range(rank)))
    return perm


def neutral_blocker(x: ir.Value, c: ir.Value, arr: np.ndarray) -> str | None:
    """Why ``x op c`` (c a neutral constant) may differ from x: "" when it provably does, a reason when
    it cannot be proven equal, None when it is x.

    The dtypes agree in any valid model (Add/Sub/Mul/Div take one type T); a known x dtype that
    differs is an invalid model, left alone. The shape is x's when c broadcasts into x's known shape,
    or when c is all ones in shape and x's rank is proven at least c's (``_value_facts.min_rank``:
    from shape inference or from producers, e.g. a Conv output has its weight's rank).
    """
    x_dtype, c_dtype = known_dtype(x), known_dtype(c)
    if x_dtype is not None and c_dtype is not None and x_dtype != c_dtype:
        return ""
    if x.shape is not None:
        return None if broadcast_keeps(dims(x), arr.shape) else ""
    if any(d != 1 for d in arr.shape):
        return "the other operand's shape is unknown and the constant is not of shape [1, ..., 1]"
    rank = min_rank(x)
    if arr.ndim == 0 or (rank is not None and rank >= arr.ndim):
        return None
    if rank is None:
        return f"the other operand's rank is unknown (the constant has rank {arr.ndim})"
    return ""


# ---------------------------------------------------------------- exact type containment

_FLOATS = {  # precision (significand bits incl. the implicit one), smallest and largest binary exponent
    ir.DataType.FLOAT16: (11, -24, 15),
    ir.DataType.BFLOAT16: (8, -133, 127),
    ir.DataType.FLOAT: (24, -149, 127),
    ir.DataType.DOUBLE: (53, -1074, 1023),
}
_INTS = {
    ir.DataType.BOOL: (0, 1),
    ir.DataType.UINT8: (0, 2**8 - 1), ir.DataType.INT8: (-(2**7), 2**7 - 1),
    ir.DataType.UINT16: (0, 2**16 - 1), ir.DataType.INT16: (-(2**15), 2**15 - 1),
    ir.DataType.UINT32: (0, 2**32 - 1), ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.UINT64: (0, 2**64 - 1), ir.DataType.INT64: (-(2**63), 2**63 - 1),
}


def is_int_like(dtype: ir.DataType | None) -> bool:
    """bool or an integer type of 8 to 64 bits."""
    return dtype in _INTS


def is_float(dtype: ir.DataType | None) -> bool:
    """float16, bfloat16, float32 or float64."""
    return dtype in _FLOATS


def holds_all(a: ir.DataType | None, b: ir.DataType | None) -> bool:
    """Whether every value of dtype ``a`` is exactly a value of dtype ``b`` (a cast a -> b -> a is exact).

    Integers fit a wider integer type, or a float type whose significand covers their magnitude;
    floats fit a float type at least as precise with at least their exponent range; bool fits every
    numeric type (as 0 and 1). Nothing else (no float fits an integer type, no 64-bit integer a float).
    """
    if a is None or b is None:
        return False
    if a == b:
        return True
    if a in _INTS:
        lo, hi = _INTS[a]
        if b in _INTS:
            return b != ir.DataType.BOOL and _INTS[b][0] <= lo and hi <= _INTS[b][1]
        if b in _FLOATS:
            return max(-lo, hi) <= 2 ** _FLOATS[b][0]
        return False
    if a in _FLOATS and b in _FLOATS:
        (pa, lo_a, hi_a), (pb, lo_b, hi_b) = _FLOATS[a], _FLOATS[b]
        return pb >= pa and lo_b <= lo_a and hi_b >= hi_a
    return False


def fits(values: np.ndarray, dtype: ir.DataType) -> bool:
    """Whether every element of the integer array ``values`` is a value of integer dtype ``dtype``."""
    if values.dtype.kind not in "biu":
        return False
    return values.size == 0 or fits_range(int(values.min()), int(values.max()), dtype)


def fits_range(lo: int, hi: int, dtype: ir.DataType) -> bool:
    """Whether every integer in [lo, hi] is a value of integer dtype ``dtype``."""
    return dtype in _INTS and _INTS[dtype][0] <= lo and hi <= _INTS[dtype][1]
