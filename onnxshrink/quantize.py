"""Static int8 quantization, end to end: ``onnxshrink.quantize(model, data, output=None, **options)``.

Steps, in order:

1. the lossless passes (the ``default`` preset) to a fixed point, so BatchNorm is folded into Conv,
   Conv+bias and Gemm patterns are formed and dead code is gone before ranges are measured;
2. an opset below 13 is upgraded with ``onnx.version_converter`` (per-channel DequantizeLinear needs 13);
3. shape inference, so the planner knows element types and tensor sizes;
4. ``qdq_rules.plan_qdq``: which nodes run quantized and which tensors need ranges;
5. ``calibration.calibrate`` of exactly those tensors on ``data`` (cached on disk by model and data);
6. ``qdq_tune.tune`` (unless ``tune=False``): a few placements timed on ONNX Runtime, the fastest kept;
7. the ``qdq`` pass, then ``dead_code``, with a structural check after each;
8. ``recovery`` hooks, the extension point for accuracy recovery (``--max-drift`` and friends): each is
   called with a ``QuantizeContext`` holding the float model, the quantized model, the plan, the table and
   the data, and may rewrite the quantized model in place.

``fusion_report(path)`` (from ``qdq_fusion``) tells which node units ONNX Runtime fused. The module is
callable: ``onnxshrink.quantize(...)`` is ``onnxshrink.quantize.quantize(...)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxshrink import data as data_mod
from onnxshrink import model_io, pipeline, qdq_tune, stats
from onnxshrink.errors import DataError, UnsupportedModelError
from onnxshrink.instruments import StructuralCheck
from onnxshrink.passes.qdq import MIN_OPSET, QDQPass
from onnxshrink.passes.qdq_rules import PlanOptions, QDQPlan, plan_qdq
from onnxshrink.qdq_fusion import FusionReport, fusion_report  # noqa: F401 - part of this module's API

logger = logging.getLogger(__name__)

CALIB_METHODS = ("minmax", "ema", "percentile", "entropy", "mse")


def default_activations() -> str:
    """The faster activation type for this CPU.

    x86: ``uint8``. MLAS's x86 kernels are u8 x s8 (VPMADDUBSW / VNNI VPDPBUSD); ORT's fusions refuse int8
    activations there (``QDQIsInt8Allowed`` is false off ARM). Measured in
    ``benchmarks/bench_qdq_signedness.py``. Elsewhere (ARM), ``int8``: the S8S8 kernels are native.
    """
    machine = platform.machine().lower()
    return "uint8" if machine in ("x86_64", "amd64", "i386", "i686", "x86") else "int8"


@dataclasses.dataclass
class QuantizeContext:
    """What a recovery hook sees. ``float_model`` is the model right before the QDQ pass."""

    float_model: ir.Model
    model: ir.Model
    plan: QDQPlan
    table: Any
    data: Any
    options: PlanOptions


RecoveryHook = Callable[[QuantizeContext], None]


@dataclasses.dataclass
class QuantizeResult:
    model: ir.Model
    plan: QDQPlan
    table: Any
    report: pipeline.PipelineReport
    before: dict
    after: dict
    seconds: float
    options: PlanOptions
    method: str
    output: Path | None = None
    opset_upgraded_from: int | None = None
    tuning: qdq_tune.TuneReport | None = None

    @property
    def skipped(self) -> list[str]:
        return [f"{n.op_type} {n.name!r}: {why}" for n, why in self.plan.skipped]

    def to_dict(self) -> dict:
        return {
            "output": str(self.output) if self.output else None,
            "seconds": self.seconds,
            "method": self.method,
            "options": self.options.to_dict(),
            "opset_upgraded_from": self.opset_upgraded_from,
            "tuning": self.tuning.to_dict() if self.tuning else None,
            "plan": self.plan.summary(),
            "skipped": self.skipped,
            "before": self.before,
            "after": self.after,
            **self.report.to_dict(),
        }


def quantize(
    model: model_io.ModelSource,
    data,
    output: str | os.PathLike | None = None,
    *,
    method: str = "minmax",
    activations: str = "auto",
    per_channel: bool = True,
    reduce_range: bool = False,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    keep_first: int = 0,
    keep_last: int = 0,
    conv_transpose: str = "weights",
    tune: bool = True,
    tune_runs: int = 20,
    lossless: bool = True,
    check: bool = True,
    batch_size: int = 8,
    providers=None,
    cache_dir=None,
    progress: bool | Callable = False,
    recovery: Sequence[RecoveryHook] = (),
    overwrite_input: bool = False,
    **observer_opts,
) -> QuantizeResult:
    """Quantize ``model`` to int8 QDQ with ranges calibrated on ``data`` and write it to ``output``.

    ``data``: a directory of ``.npz`` feeds, one stacked ``.npz``, or an iterable of feed dicts (see
    ``onnxshrink.data``). ``method``: ``minmax``, ``ema``, ``percentile``, ``entropy`` or ``mse``
    (``observer_opts`` go to the observer, e.g. ``percentile=99.99``). ``activations``: ``uint8``,
    ``int8`` or ``auto`` (the faster for this CPU). ``tune``: time a few placements on ONNX Runtime
    and keep the fastest (``qdq_tune``; off: every quantizable node is quantized). Other options: see
    ``PlanOptions``.
    """
    from onnxshrink import calibration

    t0 = time.perf_counter()
    if data is None:
        raise DataError("quantization needs calibration data (a folder of .npz feeds, a stacked .npz, "
                        "or a list of feed dicts); random data would give meaningless ranges")
    opts = PlanOptions(
        activations=default_activations() if activations == "auto" else activations,
        per_channel=per_channel, reduce_range=reduce_range, exclude=tuple(exclude),
        exclude_ops=tuple(exclude_ops), keep_first=keep_first, keep_last=keep_last,
        conv_transpose=conv_transpose,
    )
    in_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    ir_model = model_io.load(model)
    before = stats.summarize(ir_model, in_path)
    report = pipeline.PipelineReport()
    if lossless:
        _merge(report, _run(ir_model, pipeline.lossless_steps(), check))
    ir_model, upgraded = upgrade_opset(ir_model)
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(ir_model)
    plan = plan_qdq(ir_model, opts)
    _warn_if_empty(plan)
    table = calibration.calibrate(
        ir_model, data, plan.calibration_values(), method=method, batch_size=batch_size,
        providers=providers, cache_dir=cache_dir, progress=progress, **observer_opts,
    )
    tuning = None
    if tune:
        feed = next(iter(data_mod.feeds(data, ir_model)))
        opts, tuning = qdq_tune.tune(ir_model, plan, table, feed, tune_runs)
        plan = dataclasses.replace(plan, options=opts)
    final = plan_qdq(ir_model, opts, table)  # what the pass will do (it re-plans the same way)
    logger.info("QDQ plan: %s", final.summary())
    float_model = ir_model.clone() if recovery else None
    qdq = QDQPass(plan=plan, table=table)
    _merge(report, _run(ir_model, [qdq, pipeline.make_pass("dead_code")], check))
    for hook in recovery:
        hook(QuantizeContext(float_model, ir_model, final, table, data, opts))
    out_path = None
    if output is not None:
        out_path = model_io.save(ir_model, output, protected=(in_path,) if in_path else (),
                                 overwrite_input=overwrite_input)
    return QuantizeResult(
        ir_model, final, table, report, before, stats.summarize(ir_model, out_path),
        time.perf_counter() - t0, opts, method, out_path, upgraded, tuning,
    )


def _run(model: ir.Model, steps, check: bool) -> pipeline.PipelineReport:
    return pipeline.Pipeline(steps, [StructuralCheck()] if check else []).run(model)


def _merge(into: pipeline.PipelineReport, other: pipeline.PipelineReport) -> None:
    into.records.extend(other.records)
    into.iterations.update(other.iterations)


def _warn_if_empty(plan: QDQPlan) -> None:
    if plan.nodes:
        return
    reasons = sorted({why for _, why in plan.skipped})[:5]
    logger.warning(
        "QDQ: NOTHING in this model can be quantized (%d compute nodes refused%s). Nothing will change.",
        len(plan.skipped), ": " + "; ".join(reasons) if reasons else "",
    )


def upgrade_opset(model: ir.Model, target: int = MIN_OPSET) -> tuple[ir.Model, int | None]:
    """``model`` converted to opset ``target`` when its default-domain opset is lower.

    Returns ``(model, old_opset)``; ``old_opset`` is None when nothing changed. Raises
    ``UnsupportedModelError`` when onnx's version converter cannot convert the model.
    """
    old = model_io.default_opset(model)
    if old is None or old >= target:
        return model, None
    try:
        proto = onnx.version_converter.convert_version(ir.serde.serialize_model(model), target)
    except Exception as e:
        raise UnsupportedModelError(
            f"the model has opset {old}; int8 QDQ needs opset {target} and onnx.version_converter could "
            f"not convert it: {e}. Re-export the model with opset >= {target}"
        ) from e
    logger.info("upgraded the model from opset %d to %d for per-channel QDQ", old, target)
    upgraded = ir.serde.deserialize_model(proto)
    for g_old, g_new in zip(model.graphs(), upgraded.graphs()):
        base = None
        for t in g_old.initializers.values():
            if isinstance(t.const_value, ir.ExternalTensor):
                base = t.const_value.base_dir
                break
        if base:
            ir.external_data.set_base_dir(g_new, base)
    return upgraded, old


class _CallableModule(types.ModuleType):
    """Lets ``onnxshrink.quantize(...)`` call ``quantize`` while ``onnxshrink.quantize.X`` stays a module."""

    def __call__(self, *args, **kwargs) -> QuantizeResult:
        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
