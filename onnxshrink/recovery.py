"""Accuracy recovery around int8 quantization, as ``onnxshrink.quantize`` runs it.

Before calibration, on the float model (each exact in real arithmetic, so ranges are measured on the
model that will be quantized):

- ``--equalize``: ``passes/equalize.py`` (cross-layer equalization of Conv/Gemm pairs);
- ``--smoothquant [ALPHA]``: ``smoothquant_pass`` measures per-channel ``max |x|`` of the tensors
  SmoothQuant can smooth (``onnxshrink.channel_stats``, in-graph reductions) and returns the pass.

After calibration, ``Builder`` turns the float model into the quantized one for a placement and a set of
nodes kept float (the steps of ``qdq_tune.steps``, ``dead_code``, a structural check), and applies bias
corrections (``--bias-correction``: ``onnxshrink.bias_correction``, measured once on the first build and
reused by every later build; with ``joint``, another encoding's in the same probe) so that the
drift-budgeted search (``--max-drift``, ``--max-metric-drop``: ``onnxshrink.mixed_precision``) measures
exactly the models it may return. The builders of one search share a ``WeightMemo`` (``weights``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import onnx_ir as ir

from onnxshrink import bias_correction, channel_stats, pipeline, qdq_tune
from onnxshrink.graph_utils import NameGen, clone_model
from onnxshrink.instruments import StructuralCheck
from onnxshrink.passes.qdq_rules import PlanOptions, QDQPlan, plan_qdq
from onnxshrink.passes.smoothquant import SmoothQuantPass, candidates
from onnxshrink.spill import spill_initializers

logger = logging.getLogger(__name__)

#: Feeds used to measure SmoothQuant's activation maxima and bias shifts (the first ones of the data).
MAX_FEEDS = 64


def smoothquant_pass(model: ir.Model, data, alpha: float = 0.5, providers=None,
                     limit: int = MAX_FEEDS) -> SmoothQuantPass:
    """A ``SmoothQuantPass`` for ``model`` with the per-channel activation maxima measured on ``data``."""
    probe = clone_model(model)
    values = candidates(probe)
    taps = [channel_stats.ChannelTap(v, -1, "absmax") for v in values]
    names = [v.name for v in values]
    maxima = channel_stats.collect(probe, data, taps, providers=providers, limit=limit)
    logger.info("smoothquant: %d candidate tensors measured", len(names))
    return SmoothQuantPass(alpha=alpha, act_absmax={n: m for n, m in zip(names, maxima) if m is not None})


def name_nodes(model: ir.Model) -> int:
    """Give every unnamed node a unique name (exclusions, ``explain`` and bias correction address nodes
    by name). Returns how many were named."""
    names = NameGen(model)
    n = 0
    for graph in model.graphs():
        for node in graph:
            if not node.name:
                node.name = names(f"{node.op_type}_node")
                n += 1
    return n


@dataclasses.dataclass
class Builder:
    """Builds quantized models from ``float_model`` (never changed); see the module docstring."""

    float_model: ir.Model
    plan: QDQPlan
    table: Any
    options: PlanOptions
    placement: qdq_tune.Placement
    check: bool = True
    data: Any = None
    bias_correction: bool = False
    providers: Any = None
    shifts: dict | None = None
    correction: dict | None = None
    reports: dict = dataclasses.field(default_factory=dict)
    first: ir.Model | None = None  # the first build (nothing extra kept float)
    weights: Any = None  # a WeightMemo of float_model shared by the builders of one search
    #: a quantized model of the other weight encoding: its shifts are measured in the same probe as this
    #: builder's first ones, and left in ``joint_shifts`` (``(shifts, correction)``)
    joint: ir.Model | None = None
    joint_shifts: tuple | None = None

    def __call__(self, keep_float=()) -> ir.Model:
        model = clone_model(self.float_model)
        steps = qdq_tune.steps(self.float_model, self.plan, self.table, self.options, self.placement, keep_float,
                               self.weights)
        steps.append(pipeline.make_pass("dead_code"))
        # quantize's preparation has checked and warned about the float model once
        report = pipeline.Pipeline(steps, [StructuralCheck(warn_input=False)] if self.check else []).run(model)
        # its int8 weights out of anonymous memory (0.6 GB on a 2.25 GiB model), before bias correction's
        # measurement opens a session beside them (the peak of a default quantization)
        spill_initializers(model)
        if self.bias_correction and self.table is not None:
            self._correct(model)
        self.reports[id(model)] = report
        if self.first is None:
            self.first = model
        return model

    def _correct(self, model: ir.Model) -> None:
        float_names = {n.name for n in self.float_model.graph if n.name}
        targets, skipped = bias_correction.find_targets(model, float_names)
        if self.shifts is None:
            sets = [(targets, skipped)]
            if self.joint is not None:
                sets.append(bias_correction.find_targets(self.joint, float_names))
                self.joint = None
            measured = bias_correction.measure_sets(self.float_model, [t for t, _ in sets], self.data,
                                                    providers=self.providers, limit=MAX_FEEDS)
            (self.shifts, self.correction), *other = [
                (m, bias_correction.Correction(m, why, MAX_FEEDS).to_dict()) for m, (_, why) in zip(measured, sets)]
            self.joint_shifts = other[0] if other else None
            logger.info("bias correction: %d layers measured, %d skipped%s", len(self.shifts), len(skipped),
                        " (and those of the other weight encoding, in the same probe)" if other else "")
        bias_correction.apply(targets, self.shifts, NameGen(model))

    def final_plan(self, keep_float=()) -> QDQPlan:
        """The static plan the build with ``keep_float`` applies (empty when nothing runs static)."""
        qopts = qdq_tune.static_options(self.float_model, self.options, self.placement, keep_float)
        if qopts is None or self.table is None:
            return QDQPlan(self.options, (), (), True)
        return plan_qdq(self.float_model, qopts, self.table)

    def quantized_names(self, model: ir.Model) -> tuple[list[str], list[str]]:
        """Names of the statically quantized nodes and of the dynamic linear layers of ``model``."""
        static = [n.name for n in self.final_plan().nodes if n.name]
        dynamic = []
        if self.placement.linear == "dynamic":
            float_lin = {n.name for n in qdq_tune.linear_layers(self.float_model)}
            dynamic = [n.name for n in model.graph if n.name in float_lin
                       and n.op_type in ("Mul", "Add", "DynamicQuantizeLSTM")]
        return static, dynamic
