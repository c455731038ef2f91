"""``fold_scalar_scales``: a multiplication by a scalar constant, sunk into the weights it scales.

Rule [scales_folded]: ``y * c``, ``c * y`` or ``y / c`` (c a finite, non-zero floating-point scalar
constant, of a shape that cannot enlarge y) is removed when y is linear in a constant along a path of
single-use values (same graph, not graph outputs), at most ``max_depth`` nodes long:

- Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Identity: the scale moves to their data input;
- ``MatMul(A, B)``: to one operand (A first, then B);
- ``Add``/``Sub`` of a constant b: b is scaled and the scale moves to the other operand;
- ends at ``MatMul(x, W)`` / ``MatMul(W, x)`` (W scaled), ``Gemm`` (alpha and beta scaled, no tensor
  touched), ``Conv``/``ConvTranspose`` (weight and bias scaled) or ``Mul`` by a constant (scaled).

The typical case is attention's ``(Q Kᵀ) / sqrt(d)``: the scale moves into Q's projection weight and
bias. Scaled constants are new initializers (shared ones are never mutated; a constant over
``max_copy_bytes`` that other nodes still read is not copied, none over ``max_bytes`` is read).
Outputs change by float rounding only. Refused, silently, when no path ends at a constant.
In the ``default`` preset only (``pipeline.FLOAT_FUSION_PASSES``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxshrink.passes import _value_facts as vf
from onnxshrink.passes._fusion_base import Rewriter, run, set_input, sole_user

from onnxshrink.graph_utils import const_array, is_default_domain, rename_changed
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass

_MOVERS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass(frozen=True)
class FoldScalarScalesConfig:
    #: Longest path (nodes) searched from the scaling node to the constant that absorbs it.
    max_depth: int = 8
    #: A constant still read elsewhere is copied (scaled) only up to this size.
    max_copy_bytes: int = 1 << 20
    #: Constants bigger than this are never scaled (it reads them whole: external weights stay on disk).
    max_bytes: int = 64 << 20


@dataclasses.dataclass
class _Plan:
    tensors: list[tuple[ir.Node, int]]  # (node, input index) of constants to scale
    gemm: ir.Node | None = None
    scaled: list[ir.Value] = dataclasses.field(default_factory=list)  # values on the path, now scaled


def _scalar(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(y, the factor) of ``y * c`` / ``c * y`` / ``y / c``."""
    for ci in (1, 0) if node.op_type == "Mul" else (1,):
        y, arr = node.inputs[1 - ci], const_array(node.inputs[ci])
        if y is None or arr is None or arr.size != 1 or arr.dtype.kind != "f":
            continue
        if arr.ndim and (any(d != 1 for d in arr.shape) or (vf.min_rank(y) or 0) < arr.ndim):
            continue
        k = float(arr.reshape(-1)[0])
        if not np.isfinite(k) or k in (0.0, 1.0):  # 1: eliminate_identities' business
            continue
        return y, (1.0 / k if node.op_type == "Div" else k)
    return None


class _Finder:
    def __init__(self, config: FoldScalarScalesConfig) -> None:
        self.config = config

    def plan(self, y: ir.Value, user: ir.Node, depth: int = 0) -> _Plan | None:
        """Where the scale of ``y`` (read only by ``user``) can go, or None; ``scaled`` lists ``y`` and
        the values between it and the constant, whose values the fold multiplies by the scale."""
        found = self._at(y, user, depth)
        if found is not None:
            found.scaled.append(y)
        return found

    def _at(self, y: ir.Value, user: ir.Node, depth: int) -> _Plan | None:
        node = y.producer()
        if (depth >= self.config.max_depth or node is None or not is_default_domain(node)
                or node.graph is not user.graph or not sole_user(y, user) or y is not node.outputs[0]):
            return None
        op = node.op_type
        if op in _MOVERS:
            return self.plan(node.inputs[0], node, depth + 1) if node.inputs[0] is not None else None
        if op == "Gemm":
            return _Plan([], gemm=node)
        if op in ("Add", "Sub", "MatMul", "Mul") and len(node.inputs) == 2:
            return self._binary(node, depth)
        if op in ("Conv", "ConvTranspose") and self._scalable(node, 1):
            bias = len(node.inputs) > 2 and node.inputs[2] is not None
            if bias and not self._scalable(node, 2):
                return None
            return _Plan([(node, 1), *([(node, 2)] if bias else [])])
        return None

    def _binary(self, node: ir.Node, depth: int) -> _Plan | None:
        op = node.op_type
        consts = [i for i in (0, 1) if self._scalable(node, i)]
        if op == "Mul" or (op == "MatMul" and consts):
            return _Plan([(node, consts[0])]) if consts else None
        if op == "MatMul":
            for i in (0, 1):
                found = self.plan(node.inputs[i], node, depth + 1) if node.inputs[i] is not None else None
                if found is not None:
                    return found
            return None
        if len(consts) != 1 or (op == "Sub" and consts[0] == 0):
            return None  # Add/Sub: exactly one constant; c - z scales as -(z*s) + c*s only with a Neg
        other = node.inputs[1 - consts[0]]
        found = self.plan(other, node, depth + 1) if other is not None else None
        if found is not None:
            found.tensors.append((node, consts[0]))
        return found

    def _scalable(self, node: ir.Node, i: int) -> bool:
        value = node.inputs[i] if len(node.inputs) > i else None
        if value is None or value.is_graph_input() or value.is_graph_output():
            return False
        t = value.const_value
        if t is not None:
            if t.dtype not in _FLOATS:
                return False
            nbytes = t.nbytes
        else:  # a Constant node's output
            arr = const_array(value)
            if arr is None or arr.dtype.kind != "f":
                return False
            nbytes = arr.nbytes
        shared = any(u.node is not node for u in value.uses())
        return nbytes <= self.config.max_bytes and (not shared or nbytes <= self.config.max_copy_bytes)


def _apply(rw: Rewriter, root: ir.Node, plan: _Plan, y: ir.Value, k: float) -> bool:
    """Fold: ``y`` takes the root's output name (it now holds ``y * c``); the values before it on the path
    hold scaled values too and get new names, so no name means other values than in the original."""
    if not rw.replace(root, y, "scales_folded"):
        return False
    rename_changed([v for v in plan.scaled if v is not y], rw.names, "scaled")
    if plan.gemm is not None:
        for name in ("alpha", "beta"):
            value = plan.gemm.attributes.get_float(name, 1.0) * k
            plan.gemm.attributes[name] = ir.AttrFloat32(name, value)
    for node, i in plan.tensors:
        arr = const_array(node.inputs[i])
        set_input(node, i, rw.const(np.asarray(arr, np.float64) * k, arr.dtype, "scaled"))
    return True


class FoldScalarScalesPass(ShrinkPass):
    """Sink a multiplication by a scalar constant into the constant weights it scales."""

    name = "fold_scalar_scales"
    Config = FoldScalarScalesConfig
    changes = Changes.TOPOLOGY | Changes.WEIGHTS

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        finder = _Finder(self.config)

        def try_node(rw: Rewriter, node: ir.Node) -> bool:
            found = _scalar(node)
            if found is None:
                return False
            y, k = found
            plan = finder.plan(y, node)
            return plan is not None and _apply(rw, node, plan, y, k)

        run(model, stats, ("Mul", "Div"), try_node)
