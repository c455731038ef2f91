"""Empirical bias correction (Nagel et al. 2019, section 4.2, measured instead of derived).

Quantizing a layer's weights shifts the mean of its output: ``E[(W_q - W) x]`` is not zero per channel
(weight rounding is fixed, and ``E[x] != 0``), and the next layers amplify it. The input's own rounding
(round to nearest) is zero-mean: it adds noise, not a shift, so the estimate leaves it out; measured with
it, the sampling noise of the estimate outweighed the per-channel weight shifts and made PP-OCR's
classifier worse, as did correcting values a following Relu/Clip clips anyway.
For every quantized ``Conv``/``Gemm``/``MatMul`` of the main graph with a constant weight:

1. ``measure_sets`` builds one probe model from the float model: beside each such node a copy that reads
   the node's *float* input with the quantized model's int8 weight and int32 bias, and reduces
   ``y_copy - y_float = (W_q - W) x + (b_q - b)`` per output channel inside the graph
   (``onnxshrink.channel_stats``: sums, never tensors). One pass over the data gives every layer's
   shift. When a Relu/Clip follows the layer (the QDQ pass folds it into the output range), the mean is
   taken where the float output lies inside the activation's bounds: a per-channel constant moves only
   those values downstream (Nagel et al. derive the same from a clipped normal distribution).
2. ``apply`` subtracts the shift from the layer's bias in the quantized model: from the int32 bias
   (``rint(shift / bias_scale)``), or from the float constant of the ``Add`` after a ``MatMul``.

One-shot and local: every layer's shift is measured with float inputs (its own error only, as in Nagel
et al.), so the corrections are independent of each other and are applied together; a layer's
correction does not depend on which other layers stay float (mixed precision reuses them). Skipped, with
the reason: layers without a bias (a Conv without bias, a MatMul whose output is not read by exactly one
``Add`` of a float constant), layers in subgraphs, dynamically quantized layers (their activations are
quantized at run time; nothing static to correct).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxshrink import channel_stats
from onnxshrink.graph_utils import NameGen, add_initializer, clone_model, const_array, is_default_domain
from onnxshrink.passes.qdq_rules import clip_bounds

logger = logging.getLogger(__name__)

OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class Target:
    """One quantized layer of the quantized model and where its bias lives."""

    node: ir.Node
    axis: int  # channel axis of the output
    bias_kind: str  # "int32" (the layer's DequantizeLinear'd bias) or "add" (a float Add after a MatMul)
    add: ir.Node | None = None
    add_index: int = 1


@dataclasses.dataclass
class Correction:
    """What ``bias_correct`` did: per layer, the largest |shift| removed and how many channels moved."""

    shifts: dict[str, np.ndarray]
    skipped: dict[str, str]
    feeds: int

    def to_dict(self) -> dict:
        return {
            "layers_corrected": len(self.shifts),
            "max_abs_shift": {k: float(np.abs(v).max(initial=0.0)) for k, v in self.shifts.items()},
            "skipped": self.skipped,
            "feeds": self.feeds,
        }


def _dq_const(v: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear producing ``v`` from a constant, or None."""
    p = v.producer() if v is not None else None
    if p is None or p.op_type != "DequantizeLinear" or not is_default_domain(p):
        return None
    return p if const_array(p.inputs[0]) is not None else None


def _dq_activation(v: ir.Value | None) -> ir.Node | None:
    p = v.producer() if v is not None else None
    if p is None or p.op_type != "DequantizeLinear" or const_array(p.inputs[0]) is not None:
        return None
    q = p.inputs[0].producer()
    return p if q is not None and q.op_type == "QuantizeLinear" else None


def find_targets(qmodel: ir.Model, float_names: set[str]) -> tuple[list[Target], dict[str, str]]:
    """Layers of ``qmodel``'s main graph that can be corrected, and why the others cannot."""
    targets, skipped = [], {}
    for node in qmodel.graph:
        if node.op_type not in OPS or not is_default_domain(node):
            continue
        if _dq_activation(node.inputs[0]) is None or _dq_const(node.inputs[1]) is None:
            continue  # not a statically quantized layer with a constant weight
        name = node.name
        if not name or name not in float_names:
            skipped[name or "<unnamed>"] = "no float counterpart of the same name"
            continue
        axis = 1 if node.op_type == "Conv" else -1
        if node.op_type in ("Conv", "Gemm"):
            if len(node.inputs) > 2 and _dq_const(node.inputs[2]) is not None:
                targets.append(Target(node, axis, "int32"))
            else:
                skipped[name] = "no quantized bias to correct"
            continue
        add = _bias_add(node)
        if isinstance(add, str):
            skipped[name] = add
        else:
            targets.append(Target(node, axis, "add", add[0], add[1]))
    return targets, skipped


def _bias_add(node: ir.Node) -> tuple[ir.Node, int] | str:
    y = node.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output() or uses[0].node.op_type != "Add":
        return "its output is not read by exactly one Add (no bias to correct)"
    add = uses[0].node
    index = 1 - uses[0].idx
    c = const_array(add.inputs[index])
    if c is None or c.dtype != np.float32:
        return "the Add after it has no float32 constant (its bias is quantized or not constant)"
    w = const_array(_dq_const(node.inputs[1]).inputs[0])
    n = w.shape[-1]
    if c.size not in (1, n) or (c.ndim and c.shape[-1] != c.size and c.size != 1):
        return f"the bias of shape {list(c.shape)} is not one value per output channel"
    return add, index


def measure_sets(float_model: ir.Model, target_sets: list[list[Target]], data, *, providers=None,
                 limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Per set of targets, per target (by node name), the mean output shift ``E[y_q - y_f]`` per channel
    with float inputs. The sets are the targets of quantized models of ``float_model`` (one per weight
    encoding: their shifts differ), measured in one probe: one session of the float model and one pass
    over the data for all of them, each layer's copies reading the same float input and activation mask."""
    probe = clone_model(float_model)
    by_name = {n.name: n for n in probe.graph if n.name}
    names = NameGen(probe)
    taps, keys, masks = [], [], {}
    for i, targets in enumerate(target_sets):
        for t in targets:
            fnode = by_name.get(t.node.name)
            rank = _output_rank(fnode) if fnode is not None and fnode.op_type == t.node.op_type else None
            if rank is None:
                logger.info("bias correction: %r skipped (no float twin, or unknown output rank)", t.node.name)
                continue
            diff = _probe_layer(probe.graph, fnode, t.node, names)
            if diff.shape is None:
                diff.shape = ir.Shape([None] * rank)
            if fnode.name not in masks:
                masks[fnode.name] = _active_mask(probe.graph, fnode, names)
            taps.append(channel_stats.ChannelTap(diff, t.axis, "mean", masks[fnode.name]))
            keys.append((i, t.node.name))
    results = channel_stats.collect(probe, data, taps, providers=providers, limit=limit)
    out: list[dict[str, np.ndarray]] = [{} for _ in target_sets]
    for (i, name), r in zip(keys, results):
        if r is not None:
            out[i][name] = r
    return out


def _output_rank(node: ir.Node) -> int | None:
    """Rank of ``node``'s output: inferred, or a Conv's weight rank, or 2 for Gemm."""
    y = node.outputs[0]
    if y.shape is not None:
        return len(y.shape)
    if node.op_type == "Conv":
        w = const_array(node.inputs[1])
        return w.ndim if w is not None else None
    return 2 if node.op_type == "Gemm" else None


def _probe_layer(graph: ir.Graph, fnode: ir.Node, qnode: ir.Node, names: NameGen) -> ir.Value:
    """A copy of ``qnode`` in the probe graph reading ``fnode``'s float input with ``qnode``'s quantized
    weight and bias; returns ``copy_output - fnode_output``."""
    base = fnode.name
    inputs = [fnode.inputs[0]]  # the float input: its rounding is zero-mean, only noise in the estimate
    for v in qnode.inputs[1:]:
        dq = _dq_const(v)
        if dq is None:
            inputs.append(_copy_const(graph, v, names, f"{base}_bc_c") if v is not None else None)
            continue
        consts = [_copy_const(graph, c, names, f"{base}_bc_w") for c in dq.inputs]
        inputs.append(_append(graph, "DequantizeLinear", consts, names(f"{base}_bc_wdq"),
                              attrs=list(dq.attributes.values())))
    y = _append(graph, qnode.op_type, inputs, names(f"{base}_bc_y"), attrs=list(qnode.attributes.values()))
    ref = fnode.outputs[0]
    diff = _append(graph, "Sub", [y, ref], names(f"{base}_bc_diff"))
    diff.shape, diff.dtype = ref.shape, ir.DataType.FLOAT
    return diff


def _active_mask(graph: ir.Graph, fnode: ir.Node, names: NameGen) -> ir.Value | None:
    """1.0 where the Relu/Clip after ``fnode`` passes its float output through, else 0.0 (None when no
    such activation follows): the shift is measured where the next layer sees it, not where the
    activation clips it anyway."""
    y = fnode.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or uses[0].node.op_type not in ("Relu", "Clip") or not is_default_domain(uses[0].node):
        return None
    act = uses[0].node
    if act.op_type == "Clip" and any(
        v is not None and (const_array(v) is None or const_array(v).size != 1) for v in act.inputs[1:]
    ):
        return None
    lo, hi = clip_bounds(act)
    conds = []
    if np.isfinite(lo):
        c = add_initializer(graph, np.array(lo, np.float32), names(f"{fnode.name}_bc_lo"))
        conds.append(_append(graph, "Greater", [y, c], names(f"{fnode.name}_bc_above")))
    if np.isfinite(hi):
        c = add_initializer(graph, np.array(hi, np.float32), names(f"{fnode.name}_bc_hi"))
        conds.append(_append(graph, "Less", [y, c], names(f"{fnode.name}_bc_below")))
    if not conds:
        return None
    cond = conds[0] if len(conds) == 1 else _append(graph, "And", conds, names(f"{fnode.name}_bc_inside"))
    mask = _append(graph, "Cast", [cond], names(f"{fnode.name}_bc_mask"), attrs=[ir.AttrInt64("to", 1)])
    mask.shape, mask.dtype = y.shape, ir.DataType.FLOAT
    return mask


def _copy_const(graph: ir.Graph, v: ir.Value, names: NameGen, hint: str) -> ir.Value:
    return add_initializer(graph, np.asarray(const_array(v)), names(hint))


def _append(graph: ir.Graph, op: str, inputs, name: str, attrs=()) -> ir.Value:
    node = ir.Node("", op, inputs, attributes=[_copy_attr(a) for a in attrs], name=name)
    node.outputs[0].name = name
    graph.append(node)
    return node.outputs[0]


def _copy_attr(a: ir.Attr) -> ir.Attr:
    return ir.Attr(a.name, a.type, a.value)


def apply(targets: list[Target], shifts: dict[str, np.ndarray], names: NameGen) -> int:
    """Subtract each measured shift from its layer's bias in the quantized model; returns layers changed."""
    done = 0
    for t in targets:
        shift = shifts.get(t.node.name)
        if shift is None or not np.all(np.isfinite(shift)):
            continue
        if t.bias_kind == "int32":
            _correct_int32(t.node, shift, names)
        else:
            _correct_add(t.add, t.add_index, shift, names)
        done += 1
    return done


def _correct_int32(node: ir.Node, shift: np.ndarray, names: NameGen) -> None:
    dq = _dq_const(node.inputs[2])
    bq = const_array(dq.inputs[0]).astype(np.int64)
    scale = np.asarray(const_array(dq.inputs[1]), np.float64)
    new = bq - np.rint(shift.reshape(bq.shape) / scale).astype(np.int64)
    new = np.clip(new, -(2**31), 2**31 - 1).astype(np.int32)
    graph = node.graph
    q_init = add_initializer(graph, new, names(f"{node.name}_bias_corrected"))
    if len(node.inputs[2].uses()) == 1 and len(dq.inputs[0].uses()) == 1:
        old = dq.inputs[0]
        dq.replace_input_with(0, q_init)
        if not old.uses() and old.is_initializer():
            graph.initializers.pop(old.name, None)
        return
    fresh = ir.Node("", "DequantizeLinear", [q_init, dq.inputs[1], dq.inputs[2]],
                    attributes=[_copy_attr(a) for a in dq.attributes.values()], name=names(f"{node.name}_bias_dq"))
    fresh.outputs[0].name = names(f"{node.name}_bias_dq_out")
    fresh.outputs[0].dtype = ir.DataType.FLOAT
    graph.insert_before(node, fresh)
    node.replace_input_with(2, fresh.outputs[0])


def _correct_add(add: ir.Node, index: int, shift: np.ndarray, names: NameGen) -> None:
    c = const_array(add.inputs[index]).astype(np.float64)
    new = (c - shift.reshape(-1)).astype(np.float32)  # [N] (a scalar bias broadcasts to [N])
    old = add.inputs[index]
    add.replace_input_with(index, add_initializer(add.graph, new, names(f"{add.name or 'bias'}_corrected")))
    if not old.uses() and old.is_initializer():
        add.graph.initializers.pop(old.name, None)
