"""The ``smoothquant`` pass: move activation outliers into the weights of the linear layers reading them.

Xiao et al. 2023, "SmoothQuant". A tensor ``X`` whose every reader is a linear layer (``MatMul`` with a
constant 2-D weight, or ``Gemm`` with ``transA = 0``) reading it as input 0 is divided by ``s`` per input
channel (its last axis) and each reader's weight rows are multiplied by ``s``:

    s[j] = max|X[..., j]| ** alpha / max|W[j, :]| ** (1 - alpha)   (max over all readers' weights)

``X / s`` is folded into ``X``'s producer, so no node is added: ``LayerNormalization`` over the last axis
(scale and bias divided by ``s``), ``Mul`` by a per-channel constant (divided by ``s``; a scalar Mul is
refused, since turning GELU's ``* 0.5`` into a vector breaks ORT's GELU fusion, which makes it slower),
``Add(Mul(x, scale), shift)`` with constants (a decomposed LayerNorm, as Paddle exports it: both
divided), a linear layer (``MatMul``/``Gemm`` weight columns, or ``Add`` of a constant bias after one:
weight columns and bias divided by ``s``). The model computes the same function in real arithmetic; in
float32 the outputs match within rounding. The activation ranges (``max|X_j|``) come from calibration
data: ``config.act_absmax`` maps a tensor name to its per-channel maxima (``onnxshrink.channel_stats``);
``candidates(model)`` lists the tensors worth measuring.

Refuses (``stats.skip`` on the producer): a tensor with a reader that is not such a linear layer, a graph
output, a producer of another kind (Softmax, Reshape, an activation), a LayerNormalization over other
axes, constants shared with other nodes... only on nodes it would otherwise rewrite; tensors without
measured maxima are left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnxshrink.passes.equalize import replace_const

from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import NameGen, const_array, int_attr, is_default_domain, rename_changed
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass

MAX_SCALE = 1e5


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig:
    """``alpha``: migration strength in [0, 1] (0.5 balances activation and weight ranges);
    ``act_absmax``: tensor name -> per-channel ``max |x|`` along the last axis."""

    alpha: float = 0.5
    act_absmax: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant: alpha must be in [0, 1], got {self.alpha}")


def _linear_readers(x: ir.Value) -> list[ir.Node] | None:
    """The readers of ``x`` when every one is a smoothable linear layer reading it as input 0."""
    uses = list(x.uses())
    if not uses or x.is_graph_output():
        return None
    readers = []
    for use in uses:
        n = use.node
        if use.idx != 0 or not is_default_domain(n) or n.op_type not in ("MatMul", "Gemm"):
            return None
        w = const_array(n.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2 or len(n.inputs[1].uses()) > 1:
            return None
        if n.op_type == "Gemm" and int_attr(n, "transA", 0):
            return None
        readers.append(n)
    return readers


def _in_rows(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """The weight as [K, N]: row j reads input channel j."""
    return w.T if node.op_type == "Gemm" and int_attr(node, "transB", 0) else w


def _fold_target(x: ir.Value) -> tuple[str, ir.Node] | str:
    """How ``x / s`` folds into its producer: ``(kind, node)``, or why it cannot."""
    p = x.producer()
    if p is None or not is_default_domain(p):
        return "it is a graph input or comes from a custom op"
    if len(p.outputs) != 1 and p.op_type != "LayerNormalization":
        return f"its producer {p.op_type} has several outputs"
    if p.op_type == "LayerNormalization":
        axis = int_attr(p, "axis", -1)
        rank = len(x.shape) if x.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return "LayerNormalization normalizes over more than the last axis"
        if any(v.uses() for v in p.outputs[1:]) or const_array(p.inputs[1]) is None:
            return "LayerNormalization's scale is not constant or its mean/invstd outputs are used"
        return "layernorm", p
    if p.op_type == "Mul":
        consts = [i for i in (0, 1) if const_array(p.inputs[i]) is not None]
        if len(consts) != 1:
            return "a Mul without exactly one constant operand"
        if const_array(p.inputs[consts[0]]).size == 1 and not _is_affine_scale(p):
            return "a Mul by a scalar (a per-channel constant there breaks ORT's GELU fusion)"
        return "mul", p
    if p.op_type == "Add":
        consts = [i for i in (0, 1) if const_array(p.inputs[i]) is not None]
        if len(consts) == 1:
            other = p.inputs[1 - consts[0]]
            if _is_linear_producer(other.producer(), other):
                return "bias", p
            if _is_scale_mul(other.producer(), other):
                return "affine", p
        return "an Add that is not a linear layer's bias nor the shift of x * scale + shift"
    if _is_linear_producer(p, x):
        return "linear", p
    return f"its producer {p.op_type} cannot absorb a per-channel scale"


def _is_affine_scale(p: ir.Node) -> bool:
    """``p`` (a Mul) is the scale of ``x * scale + shift``: its output's only reader adds a constant."""
    uses = list(p.outputs[0].uses())
    return len(uses) == 1 and uses[0].node.op_type == "Add" and any(
        const_array(v) is not None for v in uses[0].node.inputs)


def _is_scale_mul(p: ir.Node | None, out: ir.Value) -> bool:
    """``out = Mul(x, c)`` with one constant operand and no other reader (a decomposed LayerNorm's scale)."""
    if p is None or not is_default_domain(p) or p.op_type != "Mul" or len(out.uses()) != 1:
        return False
    return sum(const_array(v) is not None for v in p.inputs) == 1


def _is_linear_producer(p: ir.Node | None, out: ir.Value) -> bool:
    if p is None or not is_default_domain(p) or p.op_type not in ("MatMul", "Gemm"):
        return False
    w = const_array(p.inputs[1]) if len(p.inputs) > 1 else None
    if w is None or w.ndim != 2 or w.dtype != np.float32 or len(out.uses()) != 1:
        return False
    return not (p.op_type == "Gemm" and int_attr(p, "transA", 0))


def candidates(model: ir.Model) -> list[ir.Value]:
    """Main-graph tensors the pass can smooth (every reader a linear layer, producer can absorb ``1/s``)."""
    out = []
    for node in model.graph:
        for x in node.outputs:
            if x.dtype in (None, ir.DataType.FLOAT) and _linear_readers(x) and not isinstance(_fold_target(x), str):
                out.append(x)
    return out


class SmoothQuantPass(ShrinkPass):
    """Divide outlier activation channels into the next linear layers' weights (see module)."""

    name = "smoothquant"
    Config = SmoothQuantConfig
    changes = Changes.WEIGHTS

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        names = NameGen(model)
        for x in candidates(model):
            amax = self.config.act_absmax.get(x.name)
            if amax is None:
                continue
            readers = _linear_readers(x)
            reason = self._smooth(x, readers, np.asarray(amax, np.float64), names)
            if reason:
                stats.skip(x.producer(), f"tensor {x.name!r} not smoothed: {reason}")
            else:
                stats.add("tensors_smoothed")
                stats.add("layers_rescaled", len(readers))

    def _smooth(self, x: ir.Value, readers: list[ir.Node], amax: np.ndarray, names: NameGen) -> str | None:
        ws = [_in_rows(n, const_array(n.inputs[1]).astype(np.float64)) for n in readers]
        if any(w.shape[0] != amax.size for w in ws):
            return f"{amax.size} measured channels but the weights read {ws[0].shape[0]}"
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        a = self.config.alpha
        with np.errstate(divide="ignore", invalid="ignore"):
            s = amax ** a / wmax ** (1 - a)
        s = np.where(np.isfinite(s) & (s > 0) & (amax > 0) & (wmax > 0), s, 1.0)
        s = np.clip(s, 1 / MAX_SCALE, MAX_SCALE)
        kind, p = _fold_target(x)
        edits = _fold_edits(kind, p, s)
        if isinstance(edits, str):
            return edits
        divided = [node for node, _, _ in edits]  # their outputs now hold x / s
        for n, w in zip(readers, ws):
            scaled = w * s[:, None]
            edits.append((n, 1, scaled.T if n.op_type == "Gemm" and int_attr(n, "transB", 0) else scaled))
        for node, index, array in edits:
            replace_const(node.graph, node, index, array.astype(np.float32), names, "sq")
        rename_changed([node.outputs[0] for node in divided], names, "smoothed")
        return None


Edit = tuple[ir.Node, int, np.ndarray]


def _fold_edits(kind: str, p: ir.Node, s: np.ndarray) -> list[Edit] | str:
    """The constant rewrites that divide the producer's output channel ``j`` by ``s[j]``, or why not."""
    if kind == "layernorm":
        edits = []
        for i in (1, 2):
            v = p.inputs[i] if len(p.inputs) > i else None
            if v is None:
                continue
            c = const_array(v).astype(np.float64)
            if c.shape[-1:] != s.shape and c.size != 1:
                return f"LayerNormalization input {i} of shape {list(c.shape)} is not one value per channel"
            edits.append((p, i, c / s))
        return edits
    if kind in ("mul", "bias", "affine"):
        i = 0 if const_array(p.inputs[0]) is not None else 1
        c = const_array(p.inputs[i]).astype(np.float64)
        if c.ndim and c.shape[-1] not in (1, s.size):
            return f"the constant of shape {list(c.shape)} does not broadcast per channel"
        edits = [(p, i, c / s)]
        if kind == "mul":
            return edits
        prev = p.inputs[1 - i].producer()
        more = _fold_edits("mul", prev, s) if kind == "affine" else _column_edits(prev, s)
        return more if isinstance(more, str) else edits + more
    return _column_edits(p, s)


def _column_edits(lin: ir.Node, s: np.ndarray) -> list[Edit] | str:
    w = const_array(lin.inputs[1]).astype(np.float64)
    trans = lin.op_type == "Gemm" and int_attr(lin, "transB", 0)
    cols = w.T if trans else w
    if cols.shape[1] != s.size:
        return f"{lin.op_type} {lin.name!r} has {cols.shape[1]} output channels, expected {s.size}"
    cols = cols / s[None, :]
    edits = [(lin, 1, cols.T if trans else cols)]
    if lin.op_type == "Gemm" and len(lin.inputs) > 2 and lin.inputs[2] is not None:
        edits.append((lin, 2, const_array(lin.inputs[2]).astype(np.float64) / s))
    return edits


