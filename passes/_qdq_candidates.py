"""Step 1 of the QDQ planner (``_qdq_planner``): the candidate nodes of a graph.

A node is a candidate when its ``qdq_rules.RULES`` entry accepts it and no option excludes it: op types
(``exclude_ops``), name patterns (``exclude``: fnmatch, or ``re:REGEX``), the speed knobs
(``speed_knob_reason``), ``conv_transpose='float'``, an Add/Mul with a mask-like constant (non-finite or
``|v| >= mask_magnitude``), or the first/last N compute layers of the model (``keep_first_last``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxshrink.passes.dynamic_quant import excluded
from onnxshrink.passes.qdq_rules import Kind, OpRule, PlanOptions, rule_for, speed_knob_reason

from onnxshrink.graph_utils import const_array

Skips = list[tuple[ir.Node, str]]


def _excluded(node: ir.Node, opts: PlanOptions) -> str | None:
    if node.op_type in opts.exclude_ops:
        return f"op type {node.op_type} excluded"
    for pat in opts.exclude:
        if excluded(node.name, [pat]):
            return f"name matches exclude pattern {pat!r}"
    return None


def candidates(graph, opts: PlanOptions, ranges, skipped: Skips) -> dict[ir.Node, OpRule]:
    """The nodes of ``graph`` a rule accepts, minus exclusions, speed knobs and mask-like Add/Mul;
    refusals of compute/binary nodes (and every exclusion) go to ``skipped`` with the reason."""
    cands: dict[ir.Node, OpRule] = {}
    for node in graph:
        rule = rule_for(node)
        if rule is None:
            continue
        reason = _excluded(node, opts) or rule.check(node)
        if reason is None:
            reason = speed_knob_reason(node, opts)
        if reason is None and node.op_type == "ConvTranspose" and opts.conv_transpose == "float":
            reason = "ConvTranspose left float (conv_transpose='float')"
        if reason is None and rule.kind is Kind.BINARY:
            reason = _static_mask(node, opts)
        if reason:
            if rule.kind in (Kind.COMPUTE, Kind.BINARY) or reason.startswith(("op type", "name")):
                skipped.append((node, reason))
            continue
        cands[node] = rule
    return cands


def _static_mask(node: ir.Node, opts: PlanOptions) -> str | None:
    for v in node.inputs:
        arr = const_array(v)
        if arr is not None and arr.size and (
            not np.all(np.isfinite(arr)) or float(np.max(np.abs(arr))) >= opts.mask_magnitude
        ):
            return f"a mask-like constant input (magnitude {float(np.max(np.abs(arr))):.3g}) is kept float"
    return None


def keep_first_last(cands: list[dict], opts: PlanOptions, skipped: Skips) -> None:
    """Drop the first/last ``keep_first``/``keep_last`` compute layers of the model (all graphs, in
    order) from ``cands``."""
    if not (opts.keep_first or opts.keep_last):
        return
    computes = [(i, n) for i, c in enumerate(cands) for n, r in c.items() if r.kind is Kind.COMPUTE]
    first = computes[: opts.keep_first]
    last = computes[len(computes) - opts.keep_last :] if opts.keep_last else []
    for i, n in first + last:
        if n in cands[i]:
            del cands[i][n]
            skipped.append((n, "among the first/last layers kept float (keep_first/keep_last)"))
