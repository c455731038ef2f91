"""``fuse_activations``: decomposed activation functions -> the standard ONNX op that computes them.

Rules (default-domain nodes, floating-point tensors; stats key in brackets):

1. Hard-swish written out, as Paddle, Keras and many PyTorch exports do:
   ``x * Clip(x + 3, 0, 6) / 6`` with the ``/ 6`` as ``Div(., 6)`` or ``Mul(., 1/6)`` and applied to
   the product or to the Clip output, operands of Add/Mul in either order, Clip bounds as inputs
   (opset >= 11) or attributes; and ``x * HardSigmoid(x, alpha=1/6, beta=0.5)`` ->
   ``HardSwish(x)`` (opset >= 14), or, below opset 14, ``x * HardSigmoid(x, alpha=1/6, beta=0.5)``
   (4 nodes -> 2) [hardswish_fused].
2. GELU written out (erf form), as Paddle, PyTorch and TensorFlow exports do: the product of ``x``,
   ``0.5`` and ``Erf(x / sqrt(2)) + 1`` (``/ sqrt(2)`` as ``Div`` or ``Mul(., 1/sqrt(2))``), the three
   factors in any order and grouping of two ``Mul`` nodes -> ``Gelu(x)`` (opset >= 20; below, left as
   it is: the ``gelu_needs_opset_20`` note says how many were left) [gelu_fused].

Rule 1's forms all compute ``x * max(0, min(1, x/6 + 1/2))``: the results differ from the written-out form by float
rounding only (measured up to 2e-8 absolute on values of magnitude 10). The constants must be
scalars (or all-ones shapes no longer than x's proven rank, see ``_value_facts.min_rank``), so the
fused op has the shape of the original. Intermediate values must have no other user and must not be
graph outputs. Refused otherwise, silently (a pattern that is not complete is not this activation).

Not in the ``lossless`` loop that quantization and pruning run (``pipeline.lossless_steps``): ORT has
no int8 kernel for HardSigmoid or HardSwish, while the written-out form quantizes op by op. The
``default`` preset runs it. Quantization runs rule 2 alone before it places Q/DQ, and upgrades the
opset to 20 for it (``quantize._fuse_for_qdq``): ONNX Runtime gives each reader of a
DequantizeLinear its own copy, so ``x`` then reaches the written-out GELU's ``Div`` and ``Mul`` as two
values, its own GELU fusion no longer matches, and five float ops run where one would. Rule 2's
``Gelu`` differs from the written-out form by float rounding only.

On ONNX Runtime (CPU, 1 thread) the fused hard-swish forms run in 0.68-0.72 of the
time of the written-out one on a stack of six, and PP-OCR cls/det/rec in 0.62/0.87/0.88 of the time
with ORT's optimizations on (``benchmarks/bench_fusions_ort.py``, ``results/fusions_ort.md``; rec
rerun on the AMD EPYC, 0.78 in the first run).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxshrink.passes import _value_facts as vf
from onnxshrink.passes._fusion_base import Rewriter, container_opset, drop_unused, note_left, run, sole_user

from onnxshrink.graph_utils import const_array, drop_node, is_default_domain
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass

_SIXTH = 1.0 / 6.0
_SQRT2 = float(np.sqrt(2.0))
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


def _node(value: ir.Value | None, op_type: str, user: ir.Node) -> ir.Node | None:
    """The ``op_type`` producer of ``value`` when ``user`` is its only reader, in ``user``'s graph."""
    node = None if value is None else value.producer()
    if node is None or node.op_type != op_type or not is_default_domain(node) or node.graph is not user.graph:
        return None
    return node if sole_user(value, user) else None


def _scalar(value: ir.Value | None, x: ir.Value) -> float | None:
    """The value of a constant whose elements are all equal and that cannot enlarge ``x``'s shape."""
    arr = const_array(value)
    if arr is None or arr.size != 1 or arr.dtype.kind != "f":
        return None
    if arr.ndim and (vf.min_rank(x) or 0) < arr.ndim:
        return None
    return float(arr.reshape(-1)[0])


def _split_const(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(the other operand, the constant) of a binary node with one scalar constant operand."""
    if len(node.inputs) != 2:
        return None
    for ci in (1, 0):
        other = node.inputs[1 - ci]
        if other is not None:
            k = _scalar(node.inputs[ci], other)
            if k is not None:
                return other, k
    return None


def _clip_bounds(clip: ir.Node, x: ir.Value) -> tuple[float | None, float | None]:
    if "min" in clip.attributes or "max" in clip.attributes:  # opset < 11
        return clip.attributes.get_float("min", None), clip.attributes.get_float("max", None)
    lo = _scalar(clip.inputs[1], x) if len(clip.inputs) > 1 and clip.inputs[1] is not None else None
    hi = _scalar(clip.inputs[2], x) if len(clip.inputs) > 2 and clip.inputs[2] is not None else None
    return lo, hi


def _gate_input(gate: ir.Value, user: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """x and the nodes of ``Clip(x + 3, 0, 6)`` when ``gate`` is its output (read only by ``user``)."""
    clip = _node(gate, "Clip", user)
    add = None if clip is None else _node(clip.inputs[0], "Add", clip)
    split = None if add is None else _split_const(add)
    if split is None or split[1] != 3.0:
        return None
    x = split[0]
    if _clip_bounds(clip, x) != (0.0, 6.0):
        return None
    return x, [clip, add]


def _is_sixth(op_type: str, k: float) -> bool:
    return (op_type == "Div" and k == 6.0) or (op_type == "Mul" and bool(np.isclose(k, _SIXTH, rtol=1e-6)))


def match_hardswish(root: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """(x, the nodes to remove besides ``root``) when ``root`` ends a written-out hard-swish."""
    split = _split_const(root) if root.op_type in ("Div", "Mul") else None
    if split is not None and _is_sixth(root.op_type, split[1]):  # (x * gate) / 6
        prod = _node(split[0], "Mul", root)
        for gi in (0, 1) if prod is not None and len(prod.inputs) == 2 else ():
            found = _gate_input(prod.inputs[gi], prod)
            if found is not None and found[0] is prod.inputs[1 - gi]:
                return found[0], [prod, *found[1]]
    if root.op_type != "Mul" or len(root.inputs) != 2:
        return None
    for gi in (0, 1):  # x * (gate / 6) and x * HardSigmoid(x)
        x, gate = root.inputs[1 - gi], root.inputs[gi]
        hsig = _node(gate, "HardSigmoid", root)
        if hsig is not None and hsig.inputs[0] is x and _is_hardswish_sigmoid(hsig):
            return x, [hsig]
        for op in ("Div", "Mul"):
            scale = _node(gate, op, root)
            inner = None if scale is None else _split_const(scale)
            if inner is not None and _is_sixth(op, inner[1]):
                found = _gate_input(inner[0], scale)
                if found is not None and found[0] is x:
                    return x, [scale, *found[1]]
    return None


def _is_hardswish_sigmoid(node: ir.Node) -> bool:
    alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
    return bool(np.isclose(alpha, _SIXTH, rtol=1e-6)) and beta == 0.5


def _try_hardswish(rw: Rewriter, root: ir.Node, opset: int) -> bool:
    found = match_hardswish(root)
    if found is None or opset < 6:
        return False
    x, inner = found
    if vf.known_dtype(x) not in _FLOATS:
        return False
    if opset >= 14:
        new = rw.new_node("HardSwish", [x], root)
    elif inner[0].op_type == "HardSigmoid":
        return False  # already the opset < 14 form
    else:
        hsig = rw.new_node("HardSigmoid", [x], root)
        hsig.attributes["alpha"] = ir.AttrFloat32("alpha", _SIXTH)
        hsig.attributes["beta"] = ir.AttrFloat32("beta", 0.5)
        new = rw.new_node("Mul", [x, hsig.outputs[0]], root)
    if not rw.replace(root, new.outputs[0], "hardswish_fused"):
        for node in (new, *([] if new.op_type == "HardSwish" else [new.inputs[1].producer()])):
            if node is not None and node.graph is not None and not any(o.uses() for o in node.outputs):
                drop_node(node)
        return False
    drop_unused(inner)  # the written-out nodes, now unread (first to last: producers after users)
    return True


def _product_factors(root: ir.Node) -> tuple[list[ir.Value], list[ir.Node]] | None:
    """The three factors of ``root = Mul(Mul(a, b), c)`` (either grouping) and the inner ``Mul``."""
    if root.op_type != "Mul" or len(root.inputs) != 2:
        return None
    for i in (0, 1):
        inner = _node(root.inputs[i], "Mul", root)
        if inner is not None and len(inner.inputs) == 2:
            return [*inner.inputs, root.inputs[1 - i]], [inner]
    return None


def _rtol(x: ir.Value) -> float:
    """How close an irrational constant of ``x``'s dtype can be: 1e-6, or two ulps of float16."""
    dtype = vf.known_dtype(x)
    return 2e-3 if dtype == ir.DataType.FLOAT16 else 1e-6


def _erf_gate(value: ir.Value, user: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """x and the nodes of ``Erf(x / sqrt(2)) + 1`` when ``value`` is its output, read only by ``user``."""
    add = _node(value, "Add", user)
    split = None if add is None else _split_const(add)
    erf = None if split is None or split[1] != 1.0 else _node(split[0], "Erf", add)
    if erf is None:
        return None
    for op, k in (("Div", _SQRT2), ("Mul", 1.0 / _SQRT2)):
        scale = _node(erf.inputs[0], op, erf)
        inner = None if scale is None else _split_const(scale)
        if inner is not None and np.isclose(inner[1], k, rtol=_rtol(inner[0])):
            return inner[0], [add, erf, scale]
    return None


def match_gelu(root: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """(x, the nodes to remove besides ``root``) when ``root`` ends a written-out (erf) GELU."""
    found = _product_factors(root)
    if found is None:
        return None
    factors, inner = found
    for gi, half in ((g, h) for g in range(3) for h in range(3) if g != h):
        gate = _erf_gate(factors[gi], inner[0] if gi < 2 else root)
        x = factors[3 - gi - half]
        k = _scalar(factors[half], x)
        if gate is not None and gate[0] is x and k is not None and k == 0.5:
            return x, [*inner, *gate[1]]
    return None


def _try_gelu(rw: Rewriter, root: ir.Node, opset: int) -> bool:
    found = match_gelu(root)
    if found is None or vf.known_dtype(found[0]) not in _FLOATS:
        return False
    if opset < 20:
        note_left(rw.stats, "gelu_needs_opset_20")
        return False
    x, inner = found
    if not rw.replace(root, rw.new_node("Gelu", [x], root).outputs[0], "gelu_fused"):
        return False
    drop_unused(inner)
    return True


def count_gelus(model: ir.Model) -> int:
    """How many written-out GELUs ``fuse_activations`` would fuse at opset 20 (main graph and subgraphs)."""
    found = (match_gelu(n) for g in model.graphs() for n in g if n.op_type == "Mul" and is_default_domain(n))
    return sum(1 for f in found if f is not None and vf.known_dtype(f[0]) in _FLOATS)


@dataclasses.dataclass(frozen=True)
class FuseActivationsConfig:
    #: Hard-swish written out -> HardSwish (opset >= 14) or x * HardSigmoid(x) (below).
    hardswish: bool = True
    #: GELU written out (erf form) -> Gelu (opset >= 20).
    gelu: bool = True


class FuseActivationsPass(ShrinkPass):
    """Replace written-out activations with the standard op (see the module docstring)."""

    name = "fuse_activations"
    Config = FuseActivationsConfig
    changes = Changes.TOPOLOGY

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        if not (self.config.hardswish or self.config.gelu):
            return
        def try_node(rw: Rewriter, node: ir.Node) -> bool:
            opset = container_opset(model, rw.container)
            if self.config.gelu and node.op_type == "Mul" and _try_gelu(rw, node, opset):
                return True
            return self.config.hardswish and _try_hardswish(rw, node, opset)

        run(model, stats, ("Div", "Mul"), try_node)
