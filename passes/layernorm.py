"""``fuse_layernorm``: a written-out layer normalization -> ``LayerNormalization`` (opset >= 17).

Rule (default-domain nodes, floating-point tensors; stats key in brackets), as Paddle, PyTorch and
TensorFlow exports write it::

    mean = ReduceMean(x, axes=A, keepdims=1)      d = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2) or Mul(d, d), axes=A, keepdims=1)
    y    = Div(d, Sqrt(Add(var, eps)))            then, optionally, Mul(y, gamma), Add(., beta)

-> ``LayerNormalization(x, gamma, beta, axis=A[0], epsilon=eps)`` [layernorm_fused], where ``A`` are the
last axes of ``x`` (its rank known), ``eps`` a scalar constant, ``gamma`` and ``beta`` constants that
vary along the normalized axes only (they become arrays of the normalized shape, which must be
static; no ``gamma``: ones). Operands of Add/Mul in either order.

Refused, silently (an incomplete pattern is not this function): intermediate values read elsewhere
or graph outputs, reductions over other axes or not keeping dims, different axes in the two means,
constants of another shape. Below opset 17 the pattern is left as it is; the
``layernorm_needs_opset_17`` note counts them.

ONNX Runtime fuses this pattern itself in a float model, so the pass changes no float latency on ORT.
It matters in two places: other runtimes, and quantization, which runs it before placing Q/DQ
(``quantize._fuse_for_qdq``, the opset upgraded to 17 for it). There ORT gives each reader of a
DequantizeLinear its own copy, so ``x`` reaches the ReduceMean and the Sub as two values and ORT's
fusion no longer matches; and the Sub, Pow, Add and Mul between them would be quantized one by one,
each adding rounding noise to a statistic that divides.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxshrink.passes import _shape_info
from onnxshrink.passes import _value_facts as vf
from onnxshrink.passes._fusion_base import (
    FLOAT_TYPES,
    Rewriter,
    candidates,
    container_opset,
    drop_unused,
    note_left,
    producer_of,
    run,
    sole_user,
)

from onnxshrink.graph_utils import const_array, int_attr, is_default_domain
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass


def _only(value: ir.Value | None, op_types: tuple[str, ...], user: ir.Node) -> ir.Node | None:
    """The producer of ``value`` (one of ``op_types``, in ``user``'s graph) when ``user`` alone reads it."""
    node = producer_of(value, op_types, user)
    return node if node is not None and sole_user(value, user) else None


def _reduced_axes(node: ir.Node, rank: int) -> tuple[int, ...] | None:
    """The sorted, non-negative axes a keepdims ReduceMean reduces, when they are the last ones of ``x``."""
    if int_attr(node, "keepdims", 1) != 1:
        return None
    axes = vf.axes(node)
    if not axes:
        return None
    norm = sorted(a % rank for a in axes if -rank <= a < rank)
    if len(norm) != len(axes) or norm != list(range(rank - len(norm), rank)):
        return None
    return tuple(norm)


def _scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 and arr.dtype.kind == "f" else None


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The operand of binary ``node`` that is not ``value`` (None if ``value`` is not one of them)."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is value:
        return node.inputs[1]
    return node.inputs[0] if node.inputs[1] is value else None


def _core(div: ir.Node) -> tuple[ir.Value, tuple[int, ...], float, list[ir.Node]] | None:
    """(x, axes, eps, the nodes before ``div``) when ``div`` ends ``(x - mean) / sqrt(var + eps)``."""
    if len(div.inputs) != 2:
        return None
    d, den = div.inputs
    sqrt = _only(den, ("Sqrt",), div)
    add = None if sqrt is None else _only(sqrt.inputs[0], ("Add",), sqrt)
    sub = None if d is None else d.producer()
    if add is None or sub is None or sub.op_type != "Sub" or sub.graph is not div.graph or len(sub.inputs) != 2:
        return None
    x, mean_v = sub.inputs
    mean = _only(mean_v, ("ReduceMean",), sub)
    rank = None if x is None or x.shape is None else len(x.shape)
    if mean is None or mean.inputs[0] is not x or not rank or d.is_graph_output():
        return None
    axes = _reduced_axes(mean, rank)
    var = next((n for n in (_only(v, ("ReduceMean",), add) for v in add.inputs) if n is not None), None)
    eps = None if var is None else _scalar(_other(add, var.outputs[0]))
    square = None if var is None else _only(var.inputs[0], ("Pow", "Mul"), var)
    if axes is None or eps is None or square is None or _reduced_axes(var, rank) != axes:
        return None
    if square.op_type == "Pow" and (square.inputs[0] is not d or _scalar(square.inputs[1]) != 2.0):
        return None
    if square.op_type == "Mul" and list(square.inputs) != [d, d]:
        return None
    readers = [div, square, *([square] if square.op_type == "Mul" else [])]  # d's only readers
    if sorted(id(u.node) for u in d.uses()) != sorted(id(n) for n in readers):
        return None
    return x, axes, eps, [sqrt, add, var, square, sub, mean]


def _affine(value: ir.Value, op: str, user_of: ir.Node, norm_shape: tuple[int, ...], rank: int):
    """(node, constant as an array of ``norm_shape``) when ``value``'s only reader is ``op(value, c)``
    with ``c`` a constant varying along the normalized axes only."""
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    node = uses[0].node
    if node.op_type != op or not is_default_domain(node) or node.graph is not user_of.graph:
        return None
    arr = const_array(_other(node, value))
    if arr is None or arr.ndim > rank or arr.dtype.kind != "f":
        return None
    k = len(norm_shape)
    lead = arr.shape[: max(arr.ndim - k, 0)]
    if any(s != 1 for s in lead):
        return None
    tail = arr.reshape(arr.shape[len(lead):])
    try:
        return node, np.broadcast_to(tail, norm_shape)
    except ValueError:
        return None


def match_layernorm(div: ir.Node) -> dict | None:
    """What a fusion ending at or after ``div`` needs: x, axis, eps, gamma, beta, the nodes it replaces."""
    core = _core(div)
    if core is None:
        return None
    x, axes, eps, inner = core
    rank = len(x.shape)
    norm_shape = tuple(x.shape[a] for a in axes)
    if not all(isinstance(s, int) for s in norm_shape):
        return None
    found = {"x": x, "axis": axes[0], "eps": eps, "gamma": None, "beta": None, "inner": inner, "root": div}
    scale = _affine(div.outputs[0], "Mul", div, norm_shape, rank)
    if scale is not None:
        found["gamma"], found["inner"], found["root"] = scale[1], [div, *inner], scale[0]
    shift = _affine(found["root"].outputs[0], "Add", div, norm_shape, rank)
    if shift is not None:
        found["beta"], found["inner"], found["root"] = shift[1], [found["root"], *found["inner"]], shift[0]
    return found  # gamma and beta broadcast to the normalized shape: the result has x's shape


def _fusable(div: ir.Node) -> dict | None:
    """``match_layernorm(div)`` when its x is a floating-point tensor."""
    found = match_layernorm(div)
    return found if found is not None and vf.known_dtype(found["x"]) in FLOAT_TYPES else None


def _try_layernorm(rw: Rewriter, div: ir.Node, opset: int) -> bool:
    found = _fusable(div)
    if found is None:
        return False
    if opset < 17:
        note_left(rw.stats, "layernorm_needs_opset_17")
        return False
    x, root = found["x"], found["root"]
    dtype = ir.DataType(vf.known_dtype(x)).numpy()
    norm_shape = tuple(x.shape[a] for a in range(found["axis"], len(x.shape)))
    gamma = found["gamma"] if found["gamma"] is not None else np.ones(norm_shape)
    inputs = [x, rw.const(gamma, dtype, "ln_scale")]
    if found["beta"] is not None:
        inputs.append(rw.const(found["beta"], dtype, "ln_bias"))
    node = rw.new_node("LayerNormalization", inputs, root)
    node.attributes["axis"] = ir.AttrInt64("axis", found["axis"])
    node.attributes["epsilon"] = ir.AttrFloat32("epsilon", found["eps"])
    if not rw.replace(root, node.outputs[0], "layernorm_fused"):
        return False
    drop_unused(found["inner"])  # users before producers
    return True


def count_layernorms(model: ir.Model) -> int:
    """How many written-out layer normalizations ``fuse_layernorm`` would fuse at opset 17."""
    return sum(1 for g in model.graphs() for n in g
               if n.op_type == "Div" and is_default_domain(n) and _fusable(n) is not None)


@dataclasses.dataclass(frozen=True)
class FuseLayerNormConfig:
    #: Run onnx shape inference first when the x of a candidate (a Sub read by a Div) lacks its shape.
    infer_shapes: bool = True


class FuseLayerNormPass(ShrinkPass):
    """Replace written-out layer normalizations with ``LayerNormalization`` (see the module docstring)."""

    name = "fuse_layernorm"
    Config = FuseLayerNormConfig
    changes = Changes.TOPOLOGY

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        if self.config.infer_shapes:
            _shape_info.fill_missing(model, candidates(model, "Div", ("Sub",)))  # the Sub's x among them
        def try_node(rw: Rewriter, node: ir.Node) -> bool:
            return _try_layernorm(rw, node, container_opset(model, rw.container))

        run(model, stats, ("Div",), try_node)
