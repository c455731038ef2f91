"""Static int8 quantization, end to end: ``onnxshrink.quantize(model, data, output=None, **options)``.

Steps, in order:

1. a model that computes in float16 is made to compute in float32 (``passes/upcast``: its inputs and
   outputs stay float16; QDQ and ONNX Runtime's integer kernels start from float32), then
   the lossless passes (the ``default`` preset) to a fixed point, so BatchNorm is folded into Conv,
   Conv+bias and Gemm patterns are formed and dead code is gone before ranges are measured;
2. an opset below 13 is upgraded with ``onnx.version_converter`` (per-channel DequantizeLinear needs 13);
   unnamed nodes get names (exclusions, ``explain`` and bias correction address nodes by name);
3. shape inference, so the planner knows element types and tensor sizes;
4. float rewrites that are exact in real arithmetic, when asked: ``equalize`` (cross-layer equalization)
   and ``smoothquant`` (SmoothQuant scale migration, its activation maxima measured on ``data``);
5. ``qdq_rules.plan_qdq``: which nodes run quantized and which tensors need ranges;
6. ``calibration.calibrate`` of exactly those tensors on ``data`` (cached on disk by model and data;
   ``auto``: one histogram run answers min/max and percentile, ``calibration.calibrate_methods``);
7. ``qdq_tune.tune`` (unless ``tune=False``): a few placements timed on ONNX Runtime, the fastest kept;
   with ``mode="auto"`` and a transformer-like model, the linear layers may run dynamic or float and the
   rest float (``qdq_tune.Placement``); a result slower than float is said in ``warnings``;
8. the build (``recovery.Builder``): the ``qdq`` pass and/or ``dynamic_quantize``, ``fuse_activations``
   on what stayed float (a float written-out hard-swish -> ``HardSwish``), ``avoid_skip_layernorm`` (a
   float residual Add before a LayerNormalization -> Sum), then ``dead_code``, with a
   structural check after each; ``bias_correction`` subtracts each layer's measured mean shift; with
   ``method="auto"`` (the default) the ranges and bias correction are chosen here by drift
   (``calib_select``);
9. ``max_drift`` / ``max_metric_drop``: the most sensitive nodes are kept float until the budget holds
   (``mixed_precision.search``);
10. ``recovery`` hooks, the extension point for more accuracy recovery: each is called with a
    ``QuantizeContext`` holding the float model, the quantized model, the plan, the table and the data,
    and may rewrite the quantized model in place or set ``ctx.model`` to another one.

An input that already holds quantized compute (``already_quantized``: ConvInteger, QLinearConv,
MatMulInteger, DequantizeLinear of constant weights, ...) is quantized on its float remainder only, and
``warnings`` (and the CLI summary) say so with the count of such nodes; its integer nodes are left as
they are (as ONNX Runtime's ``quantize_static`` leaves ops it has no float rule for).

``mode="dynamic"`` skips 5-7: MatMul/Gemm weights become int8 and their activations are quantized at
run time (``passes/dynamic_quant``); no calibration data is needed for it alone.

``fusion_report(path)`` (from ``qdq_fusion``) tells which node units ONNX Runtime fused. The module is
callable: ``onnxshrink.quantize(...)`` is ``onnxshrink.quantize.quantize(...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxshrink import data as data_mod
from onnxshrink import model_io, pipeline, qdq_tune, stats
from onnxshrink.errors import ConfigError, DataError, UnsupportedModelError
from onnxshrink.graph_utils import infer_shapes
from onnxshrink.instruments import StructuralCheck
from onnxshrink.passes._weight_memo import WeightMemo
from onnxshrink.passes.equalize import CrossLayerEqualizationPass
from onnxshrink.passes.qdq import MIN_OPSET
from onnxshrink.passes.qdq_rules import PlanOptions, QDQPlan, plan_qdq
from onnxshrink.progress import Phases
from onnxshrink.qdq_fusion import FusionReport, already_quantized, fusion_report  # noqa: F401 - API
from onnxshrink.validate import WARN_DRIFT

logger = logging.getLogger(__name__)

CALIB_METHODS = ("auto", "minmax", "ema", "percentile", "entropy", "mse")
MODES = ("auto", "static", "dynamic")


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
    """What a recovery hook sees. ``float_model`` is the model right before quantization (after the lossless
    passes and any equalization/smoothing); a hook may rewrite ``model`` in place or set ``ctx.model``."""

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
    mode: str = "auto"
    placement: qdq_tune.Placement = dataclasses.field(default_factory=qdq_tune.Placement)
    dynamic_nodes: list[str] = dataclasses.field(default_factory=list)
    recovery: dict = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    speedup: float | None = None  # float ms / this model's ms, 1 thread, on a calibration feed (when tuned)
    upcast_float16: int = 0  # float16 values made float32 before quantizing (0: the model was float32)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per step, in order

    @property
    def skipped(self) -> list[str]:
        linear = set(self.recovery.get("linear_layers", ()))
        kept = {r["node"]: r for r in self.recovery.get("mixed_precision", {}).get("kept_float", [])}
        out = []
        for n, why in self.plan.skipped:
            if n.name in kept:
                noise = kept[n.name]["added_noise"]
                noise = noise if isinstance(noise, str) else f"{noise:.3g}"
                why = f"kept float by the drift budget (adds noise {noise})"
            elif n.name in linear and self.placement.linear != "static":
                why = f"linear layer run {self.placement.linear} (placement {self.placement.to_dict()})"
                if n.name in self.dynamic_nodes:
                    continue
            out.append(f"{n.op_type} {n.name!r}: {why}")
        return out

    @property
    def quantized_nodes(self) -> int:
        """Nodes running int8: statically quantized ones plus dynamically quantized linear layers."""
        return len(self.plan.nodes) + len(self.dynamic_nodes)

    def to_dict(self) -> dict:
        return {
            "output": str(self.output) if self.output else None,
            "seconds": self.seconds,
            "method": self.method,
            "options": self.options.to_dict(),
            "opset_upgraded_from": self.opset_upgraded_from,
            "upcast_float16": self.upcast_float16,
            "tuning": self.tuning.to_dict() if self.tuning else None,
            "mode": self.mode,
            "placement": self.placement.to_dict(),
            "dynamic_nodes": self.dynamic_nodes,
            "recovery": {k: v for k, v in self.recovery.items() if k != "linear_layers"},
            "warnings": self.warnings,
            "speedup": self.speedup,
            "phases": self.phases,
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
    mode: str = "auto",
    method: str = "auto",
    activations: str = "auto",
    per_channel: bool = True,
    reduce_range: bool | str = "auto",
    pair_safe: bool | None = None,
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
    equalize: bool = False,
    smoothquant: float | None = None,
    bias_correction: bool | None = None,
    max_drift: float | None = None,
    max_metric_drop: float | None = None,
    metric: str | None = None,
    drift_data=None,
    recovery: Sequence[RecoveryHook] = (),
    overwrite_input: bool = False,
    dims: Mapping[str, int] | None = None,
    **observer_opts,
) -> QuantizeResult:
    """Quantize ``model`` to int8 with ranges calibrated on ``data`` and write it to ``output``.

    ``data``: a directory of ``.npz`` feeds, one stacked ``.npz``, or an iterable of feed dicts (see
    ``onnxshrink.data``). ``mode``: ``auto`` (static QDQ; for transformer-like models the tuner may run
    linear layers dynamic or float), ``static`` (QDQ only) or ``dynamic`` (MatMul/Gemm weights only, no
    calibration). ``method``: ``auto`` (min/max or percentile ranges, with or without bias correction,
    whichever gives the lowest drift on calibration feeds: ``calib_select``), ``minmax``, ``ema``,
    ``percentile``, ``entropy`` or ``mse`` (``observer_opts`` go to the observer, e.g.
    ``percentile=99.99``; not with ``auto``). ``activations``: ``uint8``,
    ``int8`` or ``auto`` (the faster for this CPU). ``reduce_range``: narrowed weights for every layer
    (``True``), none (``False``) or ``auto``: for the op types whose int8 kernels saturate 8-bit weights on
    this machine (``ort_int8.saturating_ops``: Conv/MatMul/Gemm on x86 CPUs with AVX2 and no VNNI).
    Narrowed static weights are 7-bit, or with ``pair_safe`` pair-safe where the op's K order is known (up
    to 8 bits, no two neighbours in the kernel's K order past 128; ``_qdq_math.kernel_rows``); ``None``
    (the default): with ``method="auto"`` and ``reduce_range="auto"``, whichever drifts less on
    calibration feeds (``calib_select``), else 7-bit. Dynamic layers' narrowed weights are always pair-safe.
    ``tune``: time a few placements on ONNX Runtime and keep the fastest (``qdq_tune``; off: every
    quantizable node is quantized). Accuracy recovery: ``equalize``, ``smoothquant`` (alpha),
    ``bias_correction`` (None: chosen by ``auto``, else off), ``max_drift`` (1 - cosine) and
    ``max_metric_drop`` with ``metric`` (measured on ``drift_data``, default ``data``); see the module
    docstring. ``dims``: input dims the summary's MACs are counted at (dim name or ``input:axis``).
    ``progress``: True draws bars on stderr (the calibration feeds read, the placements tuned, the
    calibration candidates judged, the mixed-precision builds); a callable ``fn(done, total)`` is
    called for the calibration feeds only. Other options: see ``PlanOptions``.
    """
    from onnxshrink import mixed_precision

    t0 = time.perf_counter()
    needs_data = mode != "dynamic" or smoothquant is not None or max_drift is not None or max_metric_drop is not None
    _check_args(mode, method, observer_opts, data is not None or not needs_data)
    budget = None
    if max_drift is not None or max_metric_drop is not None:
        budget = mixed_precision.Budget(max_drift, max_metric_drop, metric)
    activations = default_activations() if activations == "auto" else activations
    opts = PlanOptions(
        activations=activations, per_channel=per_channel, reduce_range=reduce_range is True,
        pair_safe=bool(pair_safe),
        reduce_range_ops=_narrowed_ops(reduce_range, activations, providers), exclude=tuple(exclude),
        exclude_ops=tuple(exclude_ops), keep_first=keep_first, keep_last=keep_last,
        conv_transpose=conv_transpose,
    )
    in_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    model_io.check_output(output, protected=(in_path,) if in_path else (), overwrite_input=overwrite_input)
    ir_model = model_io.load(model)
    before = stats.summarize(ir_model, in_path, dims=dims)
    _warn_unmatched(ir_model, exclude, exclude_ops)
    prequantized = already_quantized(ir_model)
    report = pipeline.PipelineReport()
    ir_model, upgraded = _prepare(ir_model, data, report, lossless, check, equalize, smoothquant, providers)
    feed = next(iter(data_mod.feeds(data, ir_model))) if tune and data is not None else None  # for timing
    phases = Phases(t0, "load and prepare")
    calibrate = phases.timed("calibration", functools.partial(
        _plan_and_calibrate, ir_model, data, opts, method, batch_size, providers, cache_dir, progress, observer_opts))
    plan, tables, table, tuning, placement = _calibrate_and_tune(ir_model, opts, mode, method, feed, tune_runs,
                                                                 calibrate, progress is True)
    if tuning is not None:
        phases.lap("tuning")
    opts = plan.options
    offer_pair_safe = pair_safe is None and reduce_range == "auto"
    builder, qmodel, selection = _build(ir_model, plan, tables, table, opts, placement, check, data,
                                        bias_correction, providers, method, offer_pair_safe, progress is True)
    phases.lap("calibration candidates" if selection is not None else "build")
    opts = builder.options
    table, kept, notes = builder.table, [], {}
    if budget is not None:
        qmodel, kept, notes["mixed_precision"] = _mixed(builder, qmodel, drift_data if drift_data is not None
                                                        else data, budget, providers, progress is True)
        phases.lap("mixed precision")
    _merge(report, builder.reports[id(qmodel)])
    final = builder.final_plan(kept)
    logger.info("QDQ plan: %s", final.summary())
    ctx = QuantizeContext(ir_model, qmodel, final, table, data, opts)
    for hook in recovery:
        hook(ctx)
    qmodel = ctx.model
    notes.update(_notes(builder, report))
    if prequantized:
        notes["already_quantized"] = prequantized
    if selection is not None:
        notes["calibration"] = selection.to_dict()
        method = selection.label()
    if budget is None and data is not None:
        notes["drift"] = _drift(builder.float_model, qmodel, data, providers)
    speedup = tuning.speedup if tuning is not None else None
    if feed is not None and (qmodel is not builder.first or tuning is None):  # re-time what changed
        speedup = qdq_tune.speedup(ir_model, qmodel, feed, tune_runs)
    phases.lap("drift and speed checks")
    out_path = None
    if output is not None:
        out_path = model_io.save(qmodel, output, protected=(in_path,) if in_path else (),
                                 overwrite_input=overwrite_input)
        phases.lap("save")
    return QuantizeResult(
        qmodel, final, table, report, before, stats.summarize(qmodel, out_path, dims=dims),
        time.perf_counter() - t0, opts, method, out_path, upgraded, tuning, mode, placement,
        builder.quantized_names(qmodel)[1], notes, _warnings(speedup, notes), speedup,
        sum(r.stats.counts.get("values_upcast", 0) for r in report.records if r.name == "upcast_float16"),
        dict(phases),
    )


def _narrowed_ops(reduce_range, activations: str, providers) -> tuple[str, ...]:
    """The op types whose weights get 7 bits under ``reduce_range="auto"``: those whose int8 kernels
    saturate 8-bit weights on this machine (asked of ONNX Runtime, ``ort_int8``); none otherwise."""
    from onnxshrink import ort_int8, runtime

    if reduce_range is True or reduce_range is False:
        return ()
    if reduce_range != "auto":
        raise ConfigError(f"reduce_range must be True, False or 'auto', not {reduce_range!r}")
    ops = tuple(sorted(ort_int8.saturating_ops(activations, tuple(runtime.resolve_providers(providers)))))
    if ops:
        logger.info("7-bit weights for %s: ONNX Runtime's int8 kernels on this CPU saturate 8-bit ones; "
                    "reduce_range=False keeps 8 bits", ", ".join(ops))
    return ops


def _check_args(mode: str, method: str, observer_opts: dict, have_data: bool) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, not {mode!r}")
    if method == "auto" and observer_opts:
        raise ConfigError(f"method='auto' takes no observer options ({sorted(observer_opts)}); name a method")
    if not have_data:
        raise DataError("quantization needs calibration data (a folder of .npz feeds, a stacked .npz, "
                        "or a list of feed dicts); random data would give meaningless ranges")


def _calibrate_and_tune(ir_model, opts, mode, method, feed, tune_runs, calibrate, progress: bool = False):
    """Steps 5-7: the QDQ plan and its calibration tables by method (``calibrate()``), the table the plan
    starts from, then (with a timing ``feed``) the tuned placement. Dynamic mode: nothing to calibrate."""
    placement = qdq_tune.Placement("dynamic", "float") if mode == "dynamic" else qdq_tune.Placement()
    if mode == "dynamic":
        return QDQPlan(opts, (), (), True), None, None, None, placement
    plan, tables = calibrate()
    table = tables["minmax" if method == "auto" else method]
    tuning = None
    if feed is not None:
        tuned, tuning = qdq_tune.tune(ir_model, plan, table, feed, tune_runs, regions=mode == "auto",
                                      progress=progress)
        plan = dataclasses.replace(plan, options=tuned)
        placement = tuning.placement if tuning else placement
    return plan, tables, table, tuning, placement


def _prepare(ir_model: ir.Model, data, report, lossless: bool, check: bool, equalize: bool, smoothquant,
             providers) -> tuple[ir.Model, int | None]:
    """Steps 1-4 of the module docstring: float16 upcast, lossless passes, opset upgrade, names, shapes,
    float rewrites."""
    from onnxshrink import recovery as rec
    from onnxshrink.passes.upcast import has_float16

    if has_float16(ir_model):  # float16 compute: quantized from float32, the interface stays float16
        _merge(report, _run(ir_model, [pipeline.make_pass("upcast_float16")], check))
    if lossless or check:  # no steps: the input's checks alone, warned about once here, not per candidate
        _merge(report, _run(ir_model, pipeline.lossless_steps() if lossless else [], check))
    ir_model, upgraded = upgrade_opset(ir_model)
    rec.name_nodes(ir_model)
    infer_shapes(ir_model, data_prop=True)
    ir_model, for_fusion = _fuse_for_qdq(ir_model, report, check)  # infers again if it changed the model
    upgraded = upgraded or for_fusion
    pre = [CrossLayerEqualizationPass()] if equalize else []
    if smoothquant is not None:
        pre.append(rec.smoothquant_pass(ir_model, data, smoothquant, providers))
    if pre:
        _merge(report, _run(ir_model, pre, check))
    return ir_model, upgraded


def _fuse_for_qdq(ir_model: ir.Model, report, check: bool) -> tuple[ir.Model, int | None]:
    """Written-out GELUs -> ``Gelu`` before Q/DQ placement, the opset upgraded to 20 for them; at opset
    17 or above, written-out layer normalizations -> ``LayerNormalization`` too.

    ONNX Runtime gives each reader of a DequantizeLinear its own copy, so in a QDQ model the ``x`` that
    such a pattern reads twice arrives as two values and ORT's own fusion no longer matches: a GELU
    then runs as five float ops (``passes/activations`` rule 2; PP-OCRv6 det int8 1.06x -> 1.19x
    float speed, ``results/quantize_vs_ort_avx2.md``). Layer norms do not drive the upgrade: no
    measurement here shows int8 gaining from fusing them (PP-OCR rec v4 and v6 were tried).

    Expects inferred shapes (the rules need dtypes, the layer-norm rule x's shape) and infers them
    again when it changed the model. Returns ``(model, old opset or None)``; a model onnx cannot
    convert keeps its GELUs as they are.
    """
    from onnxshrink.passes.activations import count_gelus
    from onnxshrink.passes.layernorm import count_layernorms

    upgraded = None
    if count_gelus(ir_model):
        try:
            ir_model, upgraded = upgrade_opset(ir_model, 20, "fusing its written-out GELUs into Gelu")
        except UnsupportedModelError as e:
            logger.info("written-out GELUs stay as they are: %s", e)
    opset = model_io.default_opset(ir_model) or 0
    steps = [pipeline.make_pass("fuse_activations", hardswish=False)] if opset >= 20 else []
    if opset >= 17 and count_layernorms(ir_model):
        steps.append(pipeline.make_pass("fuse_layernorm"))
    fused = _run(ir_model, steps, check) if steps else None
    if fused is not None:
        _merge(report, fused)
    if upgraded is not None or (fused is not None and fused.changed):  # fused nodes come named
        infer_shapes(ir_model, data_prop=True)
    return ir_model, upgraded


def _warn_unmatched(model: ir.Model, exclude: Sequence[str], exclude_ops: Sequence[str]) -> None:
    """An ``exclude`` pattern or op type that names nothing in the model would keep nothing float:
    say so (a misspelt name otherwise quantizes the layer the user meant to keep)."""
    from onnxshrink.passes.dynamic_quant import excluded

    nodes = list(model.graph.all_nodes())
    names, ops = [n.name or "" for n in nodes], {n.op_type for n in nodes}
    for pat in exclude:
        if not any(excluded(n, [pat]) for n in names):
            logger.warning("quantize: exclude pattern %r matches no node (for example %s)", pat,
                           ", ".join(n for n in names[:3] if n) or "the nodes have no names")
    for op in exclude_ops:
        if op not in ops:
            logger.warning("quantize: excluded op type %r is not in the model (ops: %s)", op, ", ".join(sorted(ops)))


def _plan_and_calibrate(ir_model, data, opts, method, batch_size, providers, cache_dir, progress, observer_opts):
    """The plan and its tables by method (``auto``: those ``calib_select`` chooses from, one run)."""
    from onnxshrink import calib_select, calibration

    plan = plan_qdq(ir_model, opts)
    _warn_if_empty(plan)
    kwargs = {"batch_size": batch_size, "providers": providers, "cache_dir": cache_dir, "progress": progress}
    if method == "auto":
        return plan, calibration.calibrate_methods(ir_model, data, plan.calibration_values(),
                                                   methods=calib_select.METHODS, **kwargs)
    table = calibration.calibrate(ir_model, data, plan.calibration_values(), method=method, **kwargs,
                                  **observer_opts)
    return plan, {method: table}


def _build(ir_model, plan, tables, table, opts, placement, check, data, bias_correction, providers, method,
           offer_pair_safe: bool = False, progress: bool = False):
    """``(builder, first model, Selection or None)``: with ``auto`` and a static part to calibrate, the
    candidate of ``calib_select`` with the lowest drift (pair-safe weights among them with
    ``offer_pair_safe`` when the static part has narrowed weights); otherwise the one build asked for."""
    from onnxshrink import calib_select
    from onnxshrink import recovery as rec

    weights = WeightMemo(ir_model)  # every candidate and mixed-precision step quantizes a weight once

    def make(t, bc: bool, pair_safe: bool = False):
        o = dataclasses.replace(opts, pair_safe=True) if pair_safe else opts
        return rec.Builder(ir_model, plan, t, o, placement, check, data, bc, providers, weights=weights)

    static = qdq_tune.static_options(ir_model, opts, placement)
    if method == "auto" and tables and static is not None:
        narrowed = any(op in static.reduce_range_ops for op in ("Conv", "MatMul", "Gemm"))  # "auto" narrowing
        return calib_select.select(make, tables, data, bias_correction=bias_correction, providers=providers,
                                   pair_safe=offer_pair_safe and narrowed, progress=progress)
    builder = make(table, bool(bias_correction))
    return builder, builder(), None


def _mixed(builder, first: ir.Model, data, budget, providers, progress: bool = False
           ) -> tuple[ir.Model, list[str], dict]:
    from onnxshrink import mixed_precision

    static, dynamic = builder.quantized_names(first)
    model, report = mixed_precision.search(builder.float_model, lambda keep: builder(keep) if keep else first,
                                           static + dynamic, data, budget, dynamic=dynamic, providers=providers,
                                           progress=progress)
    return model, [row["node"] for row in report.kept], report.to_dict()


def _notes(builder, report: pipeline.PipelineReport) -> dict:
    notes: dict = {"linear_layers": [n.name for n in qdq_tune.linear_layers(builder.float_model)]}
    passes = report.per_pass()
    for name in ("cross_layer_equalization", "smoothquant"):
        if name in passes:
            notes[name] = {"counts": passes[name]["counts"], "skipped": passes[name]["skipped"][:20]}
    if builder.correction is not None:
        notes["bias_correction"] = builder.correction
    return notes


def _drift(float_model: ir.Model, qmodel: ir.Model, data, providers) -> dict:
    """The quantized model's ``1 - cosine`` against the float one on up to 4 calibration feeds."""
    from onnxshrink import mixed_precision

    try:
        value, feeds = mixed_precision.drift(float_model, qmodel, data, providers)
    except Exception as e:  # noqa: BLE001 - only a note: a failed run (ShrinkError or ORT's own) is said, not raised
        return {"drift": None, "why": str(e)[:300]}
    return {"drift": value, "feeds": feeds}


def _warnings(speedup: float | None, notes: dict) -> list[str]:
    out = []
    pre = notes.get("already_quantized")
    if pre:
        out.append(f"the input model is ALREADY QUANTIZED: {sum(pre.values())} nodes hold integer compute "
                   f"({', '.join(f'{op} {n}' for op, n in pre.items())}); they are left as they are and only "
                   "its float remainder was quantized (re-quantizing int8 weights would stack rounding errors: "
                   "quantize the float original instead)")
    if speedup is not None and speedup < 1 - qdq_tune.MIN_GAIN:
        out.append(f"the quantized model is SLOWER than float on this CPU: {speedup:.2f}x float speed "
                   "(1 thread, timed on a calibration feed)")
    drift = notes.get("drift", {}).get("drift")
    if drift is not None and drift > WARN_DRIFT:
        out.append(f"int8 changed the outputs a lot: 1 - cosine {drift:.3g} (worst output) on "
                   f"{notes['drift']['feeds']} calibration feeds, over {WARN_DRIFT}; check accuracy before "
                   f"deploying, or give --max-drift {WARN_DRIFT} to keep the noisiest nodes float")
    kept = notes.get("mixed_precision", {})
    if kept and not kept.get("met"):
        out.append("the drift budget is NOT met even with every quantized node float")
    for line in out:
        logger.warning("quantize: %s", line)
    return out


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


def upgrade_opset(model: ir.Model, target: int = MIN_OPSET, why: str = "per-channel QDQ"
                  ) -> tuple[ir.Model, int | None]:
    """``model_io.upgrade_opset`` with per-channel QDQ's opset (13) as the default target."""
    return model_io.upgrade_opset(model, target, why)


class _CallableModule(types.ModuleType):
    """Lets ``onnxshrink.quantize(...)`` call ``quantize`` while ``onnxshrink.quantize.X`` stays a module."""

    def __call__(self, *args, **kwargs) -> QuantizeResult:
        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
