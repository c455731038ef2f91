"""Structured pruning, end to end: ``onnxshrink.prune(model, ratio, output=None, **options)``.

Steps, in order:

1. cleanup that keeps BatchNormalization (``fold_constants``, ``eliminate_identities``, ``cse``,
   ``dead_code``), so computed Reshape targets become constants and the ``bn`` criterion and BN
   re-estimation still see the BNs;
2. the dependency graph (``onnxshrink.depgraph``) and, for data criteria, per-channel activation
   statistics streamed from the calibration data;
3. the plan (``onnxshrink.prune_plan.plan_pruning``, or ``plan=`` given), optionally written as JSON;
   for a latency or MACs target with calibration data, the allocated plan and the uniform plan that
   fits the same estimate are both built (steps 4-5) and the one that drifts less is kept (``_choose``);
4. the ``prune_channels`` pass with a structural check (checker and strict shape inference);
5. optionally reconstruction on the calibration data (``onnxshrink.reconstruct``): ``"lsq"``
   least-squares refit of the layers that lost inputs, or ``"bn"`` BatchNorm re-estimation;
6. the lossless passes (BN folded into Conv) and ``avoid_skip_layernorm`` unless ``lossless=False``.

MACs, the per-layer table and the planner's latency/MACs estimates are taken at the model's operating
size: ``dims`` if given, else the shape of the first calibration feed (every symbolic input dim but
the batch axis, which counts as 1). Without either, symbolic dims count as 1: a conv net with
symbolic height and width (a PP-OCR export) is then costed at 1x1 pixels, and a latency or MACs
target plans for that (it is logged).

The result holds the plan, a per-layer table (channels, parameters and MACs before and after) and the
reconstruction report. Then quantize the pruned model if wanted (prune first, then quantize).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from onnxshrink import data, depgraph, importance, model_io, pipeline, stats
from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import clone_model, int_attr, release_models
from onnxshrink.instruments import StructuralCheck
from onnxshrink.progress import Phases
from onnxshrink.prune_plan import PruningPlan, plan_pruning

logger = logging.getLogger(__name__)

#: Calibration feeds the budgeted plan and its uniform twin are measured on (``_choose``).
CHECK_FEEDS = 8
#: The uniform plan replaces the allocated one (what the user asked for) only when its drift is below
#: (1 - MIN_GAIN) x the allocated's: the check is for compounded cuts (digits inception at 62%: 1.8x the
#: uniform plan's drift on the held-out feeds), and a few held-out feeds are noisy (PP-OCR cls at 70%: 0.109
#: against 0.125 on 4 held-out feeds, the other way round on 16 evaluation feeds;
#: ``benchmarks/results/prune_check_avx2.md``).
MIN_GAIN = 0.2


@dataclasses.dataclass
class PruneResult:
    model: ir.Model
    plan: PruningPlan
    layers: list[dict]
    before: dict
    after: dict
    report: pipeline.PipelineReport
    reconstruction: dict | None
    seconds: float
    output: Path | None = None
    dims: dict = dataclasses.field(default_factory=dict)  # the input dims MACs and estimates were taken at
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per step, in order

    def to_dict(self) -> dict:
        return {
            "output": str(self.output) if self.output else None, "seconds": self.seconds,
            "phases": self.phases,
            "plan": self.plan.summary(), "layers": self.layers, "before": self.before, "after": self.after,
            "reconstruction": self.reconstruction, **self.report.to_dict(),
        }


def prune(
    model: model_io.ModelSource,
    ratio: float = 0.3,
    output: str | os.PathLike | None = None,
    *,
    criterion: str = "l1",
    calibration=None,
    reconstruct: bool | str = False,
    scope: str = "local",
    target: str = "channels",
    kernels=None,
    round_to: int | None = None,
    min_width: int = 8,
    protect: Sequence[str] = (),
    layer_ratios: Mapping[str, float] | None = None,
    grouped: str = "auto",
    plan: PruningPlan | str | os.PathLike | None = None,
    plan_out: str | os.PathLike | None = None,
    lossless: bool = True,
    check: bool = True,
    overwrite_input: bool = False,
    dims: Mapping[str, int] | None = None,
    progress=None,
    uniform_check: bool = True,
) -> PruneResult:
    """Remove ``ratio`` of the prunable channels of ``model`` (see the module doc for the steps), or,
    with ``target="latency"``/``"macs"``, ``ratio`` of its estimated latency or of its MACs with
    widths chosen per group (``onnxshrink.prune_alloc``; ``kernels``: the kernel throughput table,
    ``"default"``, ``"measure"`` or a saved one).

    ``calibration``: feeds (folder of .npz, stacked .npz, list of dicts) for the ``activation`` and
    ``reconstruction`` criteria and for ``reconstruct`` (``True``/``"lsq"``: least-squares refit;
    ``"bn"``: BatchNorm re-estimation only). ``plan``: apply this plan (object or JSON path) instead
    of planning; ``plan_out``: write the plan used as JSON. ``dims``: input dims for MACs and
    estimates (dim name or ``input:axis`` -> size; default: from the first calibration feed).
    ``progress``: bars on stderr (True) or ``fn(done, total)`` over the calibration feeds read by the
    data criteria and by reconstruction (each pass over the data counts its feeds).
    """
    t0 = time.perf_counter()
    method = {True: "lsq", False: None, None: None}.get(reconstruct, reconstruct)
    crit = importance.get(criterion)
    if (crit.needs_data or method) and calibration is None:
        raise ConfigError(f"pruning with criterion {crit.name!r}"
                          f"{' and reconstruction' if method else ''} needs calibration data")
    in_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    model_io.check_output(output, protected=(in_path,) if in_path else (), overwrite_input=overwrite_input)
    ir_model = model_io.load(model)
    if calibration is not None:
        calibration = data.feeds(calibration, ir_model)  # re-iterable; read once by every step
    dims = operating_dims(ir_model, calibration) if dims is None else dict(dims)
    before = stats.summarize(ir_model, in_path, dims=dims)
    report = pipeline.PipelineReport()
    insts = [StructuralCheck()] if check else []
    _run(ir_model, pipeline.pre_prune_steps(), insts, report)
    phases = Phases(t0, "load and prepare")
    dg = uniform = None
    if plan is None:
        dg = depgraph.build(ir_model, grouped=grouped)
        act = importance.collect(ir_model, dg, calibration, crit, progress=progress)
        if act is not None:
            phases.lap("importance")
        plan = plan_pruning(ir_model, ratio, criterion=crit, scope=scope, round_to=round_to,
                            min_width=min_width, protect=protect, layer_ratios=layer_ratios,
                            stats=act, grouped=grouped, graph=dg, target=target, kernels=kernels,
                            dims=dims)
        phases.lap("plan")
        if uniform_check and calibration is not None and plan.uniform is not None \
                and _widths(plan.uniform) != _widths(plan):  # the same widths: nothing to measure
            uniform = plan.uniform
    elif not isinstance(plan, PruningPlan):
        plan = PruningPlan.load(plan)
    original = clone_model(ir_model) if method or uniform else None
    rows_before = layer_rows(ir_model, dims)
    if uniform is None:
        recon = _apply(ir_model, plan, dg, original, method, calibration, insts, report, progress)
    else:
        ir_model, plan, recon = _choose(ir_model, original, plan, uniform, dg, method, calibration, insts,
                                        report, progress)
    phases.lap(("uniform check, " if uniform is not None else "") + ("apply and refit" if method else "apply"))
    if plan_out is not None:
        plan.save(plan_out)
    table = merge_rows(rows_before, layer_rows(ir_model, dims))
    if lossless:
        _run(ir_model, pipeline.after_prune_steps(), insts, report)
        phases.lap("cleanup")
    out_path = None
    if output is not None:
        out_path = model_io.save(ir_model, output, protected=(in_path,) if in_path else (),
                                 overwrite_input=overwrite_input)
        phases.lap("save")
    after = stats.summarize(ir_model, out_path, dims=dims)
    return PruneResult(ir_model, plan, table, before, after, report, recon, time.perf_counter() - t0, out_path,
                       dims, dict(phases))


def _apply(model, plan, dg, original, method, calibration, insts, report, progress) -> dict | None:
    """The ``prune_channels`` pass (``dg``: the dependency graph of ``model``, or None to build it), then
    reconstruction if asked; returns the reconstruction report."""
    _run(model, [pipeline.make_pass("prune_channels", plan=plan, graph=dg)], insts, report)
    kept = next((r.stats.notes.get("kept") for r in report.records if r.name == "prune_channels"), {})
    if not (method and kept):
        return None
    from onnxshrink.reconstruct import reconstruct as run_reconstruct

    recon = run_reconstruct(original, model, kept, calibration, method=method, progress=progress).to_dict()
    for inst in insts:
        inst.after_step("reconstruction", model)
    return recon


def _choose(model, original, plan, uniform, dg, method, calibration, insts, report, progress):
    """Build the allocated ``plan`` and the ``uniform`` plan the cost model puts within the same budget,
    and keep the one whose outputs drift less from ``original`` (the uniform one must be
    :data:`MIN_GAIN` lower). The allocator adds up per-group losses, and cuts that each cost little
    can compound: digits inception at a 62% latency budget lost 14.7 points with one 32-channel group
    at 8, where the uniform plan at the same estimate lost 2.2; ``benchmarks/bench_prune_check.py``
    judges the choice on evaluation data (``results/prune_check_avx2.md``).

    With reconstruction, a refit judged on the feeds it was fit to looks better than it is, so both are
    refit on all feeds but the first :func:`_held_out` ones, judged on those, and the kept plan is then
    refit on every feed; without reconstruction the kept plan is applied again (cheap). The candidates
    run without the structural check; the kept plan's final application has it. Returns (model, plan,
    reconstruction report)."""
    from onnxshrink.validate import FeedsDrift

    held = _held_out(calibration) if method else 0
    fit = calibration.subset(held) if held else calibration
    judge = FeedsDrift(original, calibration.subset(0, held) if held else calibration, held or CHECK_FEEDS)
    drift = {}
    for label, p in (("uniform", uniform), ("allocated", plan)):
        trial = clone_model(model)  # one candidate in memory at a time; the kept plan is checked below
        _apply(trial, p, None, original, method, fit, [], pipeline.PipelineReport(), progress)
        drift[label] = judge(trial)
        del trial
        release_models()
    label = "uniform" if drift["uniform"] < (1 - MIN_GAIN) * drift["allocated"] else "allocated"
    chosen = uniform if label == "uniform" else plan
    recon = _apply(model, chosen, dg, original, method, calibration, insts, report, progress)  # every feed
    chosen.settings["check"] = {
        "asked": {"target": plan.settings["target"], "ratio": plan.settings["ratio"]},
        "feeds": judge.n, "held_out": bool(held), "kept": label,
        "tried": [{"plan": lbl, "widths": _widths(p), "drift": drift[lbl],
                   "uniform_ratio": p.settings["ratio"] if lbl == "uniform" else None}
                  for lbl, p in (("uniform", uniform), ("allocated", plan))]}
    logger.info("pruning: %s plan kept (drift uniform %s, allocated %s) on %d %scalibration feeds", label,
                drift["uniform"], drift["allocated"], judge.n, "held-out " if held else "")
    return model, chosen, recon


def _held_out(calibration) -> int:
    """Feeds to judge refit candidates on, left out of their refit: a quarter of the calibration feeds,
    at most :data:`CHECK_FEEDS`; 0 (judge on the feeds they were fit on) with fewer than 4 feeds or a
    source of unknown length."""
    n = calibration.count
    return 0 if n is None or n < 4 else min(CHECK_FEEDS, n // 4)


def _widths(plan: PruningPlan) -> list[int]:
    return [g.kept_channels for g in plan.groups if g.status in ("pruned", "unchanged")]


def operating_dims(model: ir.Model, calibration=None) -> dict[str, int]:
    """``input:axis`` -> size of every symbolic input dim but axis 0 (the batch, left at 1), from the
    first calibration feed; empty without calibration (then logged when the model has such dims)."""
    symbolic = [(s.name, i) for s in data.input_specs(model) for i, d in enumerate(s.dims)
                if i > 0 and not isinstance(d, int)]
    if not symbolic:
        return {}
    if calibration is None:
        logger.info("inputs have symbolic dims %s: MACs and latency estimates count them as 1 "
                    "(give calibration data or dims)", ", ".join(f"{n}:{i}" for n, i in symbolic))
        return {}
    first = next(iter(calibration))
    return {f"{n}:{i}": int(first[n].shape[i]) for n, i in symbolic if n in first and first[n].ndim > i}


def _run(model, steps, insts, report) -> None:
    sub = pipeline.Pipeline(steps, insts).run(model)
    report.records.extend(sub.records)
    report.iterations.update(sub.iterations)


# ---------------------------------------------------------------- per-layer table


def layer_rows(model: ir.Model, dims: Mapping[str, int] | None = None) -> dict[ir.Node, dict]:
    """Channels in/out, parameters and MACs (at ``dims``; dims still symbolic count as 1) of every
    layer with a constant weight."""
    shapes = stats.inferred_shapes(model, dims)
    rows = {}
    for node in model.graph:
        if node.op_type not in depgraph.WEIGHT_AXES or len(node.inputs) < 2:
            continue
        axes = depgraph.weight_axes(node, 1)
        if axes is None:
            continue
        w = node.inputs[1]
        wshape = shapes.get(w.name) or tuple(w.const_value.shape)
        g = int_attr(node, "group", 1)
        cin = wshape[axes[1]] * (g if node.op_type == "Conv" else 1)
        cout = wshape[axes[0]] * (g if node.op_type == "ConvTranspose" else 1)
        params = sum(int(_numel(shapes.get(v.name))) for v in node.inputs[1:] if v is not None and v.name in shapes)
        rows[node] = {"layer": node.name or node.outputs[0].name, "op": node.op_type, "in": cin,
                      "out": cout, "params": params, "macs": stats.node_macs(node, shapes)}
    return rows


def _numel(shape) -> int:
    n = 1
    for d in shape or ():
        n *= int(d) if isinstance(d, int) else 1
    return n


def merge_rows(before: dict, after: dict) -> list[dict]:
    out = []
    for node, b in before.items():
        a = after.get(node, b)
        out.append({"layer": b["layer"], "op": b["op"], "in": [b["in"], a["in"]], "out": [b["out"], a["out"]],
                    "params": [b["params"], a["params"]], "macs": [b["macs"], a["macs"]]})
    return out


def format_layers(rows: list[dict]) -> str:
    """The per-layer before -> after table."""
    from onnxshrink.report import format_table

    def arrow(pair):
        return f"{pair[0]:,}" if pair[0] == pair[1] else f"{pair[0]:,} -> {pair[1]:,}"

    body = [[r["layer"], r["op"], arrow(r["in"]), arrow(r["out"]), arrow(r["params"]), arrow(r["macs"])]
            for r in rows]
    tb, ta = (sum(r["macs"][i] for r in rows) for i in (0, 1))
    pb, pa = (sum(r["params"][i] for r in rows) for i in (0, 1))
    body.append(["total", "", "", "", arrow([pb, pa]), arrow([tb, ta])])
    return format_table(["layer", "op", "in ch", "out ch", "params", "MACs"], body)
