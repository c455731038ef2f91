"""Pick the fastest QDQ placement for this CPU by measuring it.

ONNX Runtime's x86 int8 kernels are not uniformly faster than its float ones: dense convolutions with
many MACs per output gain 2-4x, but int8 depthwise convolutions are slower than the NCHWc float kernels
(``benchmarks/results/qdq_op_costs.json``), and whether a float depthwise conv pays for its Q/DQ
depends on the layout chain around it (ORT keeps int8 chains in NHWC). So ``tune`` tries placements
that differ in the speed knobs of ``PlanOptions`` (``depthwise``, ``min_conv_macs``, ``matmul_activations``,
``pools``, ``elementwise``), one change at a time on top of the best so far, timed on ONNX Runtime against
that best (1 thread, interleaved rounds, a calibration feed), and keeps what is faster.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import onnx_ir as ir

from onnxshrink import model_io, runtime
from onnxshrink.passes.qdq import QDQPass
from onnxshrink.passes.qdq_rules import PlanOptions, QDQPlan, plan_qdq

logger = logging.getLogger(__name__)

#: Models with more initializer bytes than this are not tuned (each variant would be a full copy).
MAX_TUNE_BYTES = 512 * 2**20


#: Knob changes tried in order, each from the best placement so far.
STEPS: tuple[dict, ...] = (
    {"depthwise": False},
    {"min_conv_macs": 64},
    {"min_conv_macs": 256},
    {"matmul_activations": False},
    {"pools": False},
    {"elementwise": False},
)
#: A change is kept when it makes the model at least this much faster (paired medians).
MIN_GAIN = 0.02


@dataclasses.dataclass
class TuneReport:
    """``tried``: each placement timed (its knobs, median ms, quantized nodes, kept or not)."""

    float_ms: float
    chosen: dict
    tried: list[dict]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tune(model: ir.Model, plan: QDQPlan, table, feed: dict, runs: int = 20) -> tuple[PlanOptions, TuneReport | None]:
    """Options of the fastest placement found for ``model`` (which is not changed), and the timings.

    Greedy: start from the plan's options; try each change of ``STEPS`` on top of the best so far,
    timed against it in interleaved rounds; keep it when at least ``MIN_GAIN`` faster. A change that
    quantizes the same nodes as the best so far, or nothing at all, is not timed. Models over
    ``MAX_TUNE_BYTES`` are not tuned (returns the plan's options and None).
    """
    if model_io.initializer_bytes(model) > MAX_TUNE_BYTES:
        logger.info("QDQ tuning skipped: the model is larger than %d MiB", MAX_TUNE_BYTES // 2**20)
        return plan.options, None
    best = plan.options
    best_nodes = _nodes(model, best, table)
    if not best_nodes:
        return best, None
    best_sess = _session(model, plan, best, table)
    float_sess = runtime.make_session(model_io.to_bytes(model), threads=1)
    f_ms, b_ms = _paired(float_sess, best_sess, feed, runs)
    del float_sess
    tried = [{**_knobs(best), "median_ms": round(b_ms, 4), "quantized_nodes": len(best_nodes), "kept": True}]
    for step in STEPS:
        cand = dataclasses.replace(best, **step)
        nodes = _nodes(model, cand, table)
        if not nodes or nodes == best_nodes:
            continue
        cand_sess = _session(model, plan, cand, table)
        b_ms, c_ms = _paired(best_sess, cand_sess, feed, runs)
        keep = c_ms < b_ms * (1 - MIN_GAIN)
        tried.append({**_knobs(cand), "median_ms": round(c_ms, 4), "quantized_nodes": len(nodes), "kept": keep,
                      "vs_best_ms": round(b_ms, 4)})
        if keep:
            best, best_nodes, best_sess = cand, nodes, cand_sess
    report = TuneReport(round(f_ms, 4), _knobs(best), tried)
    logger.info("QDQ tuning: float %.3f ms; chose %s; tried %s", f_ms, report.chosen, tried)
    return best, report


def _nodes(model: ir.Model, opts: PlanOptions, table) -> frozenset:
    return frozenset(id(n) for n in plan_qdq(model, opts, table).nodes)


def _session(model: ir.Model, plan: QDQPlan, opts: PlanOptions, table):
    clone = model.clone()
    QDQPass(plan=dataclasses.replace(plan, options=opts), table=table)(clone)
    return runtime.make_session(model_io.to_bytes(clone), threads=1)


def _knobs(opts: PlanOptions) -> dict:
    return {k: getattr(opts, k) for k in ("depthwise", "min_conv_macs", "matmul_activations", "pools",
                                          "elementwise")}


def _paired(a, b, feed: dict, runs: int) -> tuple[float, float]:
    """Median ms of sessions ``a`` and ``b``, run in alternating order after a short warm-up."""
    for s in (a, b):
        for _ in range(3):
            s.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(runs):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            t = time.perf_counter()
            (a, b)[j].run(None, feed)
            times[j].append(time.perf_counter() - t)
    return float(np.median(times[0])) * 1e3, float(np.median(times[1])) * 1e3
