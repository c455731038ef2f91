"""Pick the fastest QDQ placement for this CPU by measuring it.

ONNX Runtime's x86 int8 kernels are not uniformly faster than its float ones: dense convolutions with
many MACs per output gain 2-4x, but int8 depthwise convolutions are slower than the NCHWc float kernels
(``benchmarks/results/qdq_op_costs.json``), and whether a float depthwise conv pays for its Q/DQ
depends on the layout chain around it (ORT keeps int8 chains in NHWC). So ``tune`` builds a few
placements that differ only in the speed knobs of ``PlanOptions`` (``depthwise``, ``min_conv_macs``,
``matmul_activations``),
times them on ONNX Runtime (1 thread, rounds interleaved, a calibration feed) and returns the options
of the fastest. Placements that quantize the same nodes are timed once.
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


def variants(opts: PlanOptions) -> list[PlanOptions]:
    """The placements tried: as asked; depthwise convs float; small convs float as well (two sizes);
    MatMuls of two activations float (attention)."""
    return [
        opts,
        dataclasses.replace(opts, depthwise=False),
        *(dataclasses.replace(opts, depthwise=False, min_conv_macs=max(opts.min_conv_macs, m)) for m in (64, 256)),
        dataclasses.replace(opts, matmul_activations=False),
    ]


@dataclasses.dataclass
class TuneReport:
    chosen: int
    options: list[dict]
    median_ms: list[float]
    float_ms: float
    quantized_nodes: list[int]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tune(model: ir.Model, plan: QDQPlan, table, feed: dict, runs: int = 20) -> tuple[PlanOptions, TuneReport | None]:
    """Options of the fastest placement of ``model`` (not changed), with the timings; without tuning
    (model too big, nothing to choose between) the plan's own options and None."""
    if model_io.initializer_bytes(model) > MAX_TUNE_BYTES:
        logger.info("QDQ tuning skipped: the model is larger than %d MiB", MAX_TUNE_BYTES // 2**20)
        return plan.options, None
    cands, keys, counts = [], [], []
    for opts in variants(plan.options):
        final = plan_qdq(model, opts, table)
        key = frozenset(id(n) for n in final.nodes)
        if key in keys or not final.nodes:
            continue
        keys.append(key)
        cands.append(opts)
        counts.append(len(final.nodes))
    if len(cands) < 2:
        return plan.options, None
    blobs = [model_io.to_bytes(model)]
    for opts in cands:
        clone = model.clone()
        QDQPass(plan=dataclasses.replace(plan, options=opts), table=table)(clone)
        blobs.append(model_io.to_bytes(clone))
    times = _interleaved([runtime.make_session(b, threads=1) for b in blobs], feed, runs)
    medians = [float(np.median(t)) * 1e3 for t in times]
    best = int(np.argmin(medians[1:]))
    report = TuneReport(best, [_knobs(o) for o in cands], [round(m, 4) for m in medians[1:]],
                        round(medians[0], 4), counts)
    logger.info("QDQ tuning: float %.3f ms; variants %s ms; chosen %s", medians[0], report.median_ms,
                report.options[best])
    return cands[best], report


def _knobs(opts: PlanOptions) -> dict:
    return {"depthwise": opts.depthwise, "min_conv_macs": opts.min_conv_macs,
            "matmul_activations": opts.matmul_activations}


def _interleaved(sessions, feed: dict, runs: int) -> list[list[float]]:
    for s in sessions:
        for _ in range(3):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for i in range(runs):
        for j in order if i % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            sessions[j].run(None, feed)
            times[j].append(time.perf_counter() - t)
    return times
