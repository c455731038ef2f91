"""Pruning plans: which atoms of which dependency group to remove. Pure and JSON-serializable.

``plan_pruning(model, ratio, ...)`` scores every unblocked group with an importance criterion and
picks the atoms to remove; it never changes the model. A plan lists every group (``remove``: atom
indices, editable by hand; ``status`` says why a group is left whole) and the settings it was made
with. Applying a plan (``passes/prune_channels.py``) rebuilds the dependency graph of the model it is
given and matches groups by ``key`` (a hash of the group's slots), so a plan made for another model
is refused instead of misapplied.

Widths: ``ratio`` of each group's channels is removed (``scope="local"``), or the lowest-scoring
``ratio`` of all prunable channels with scores normalized per group (``scope="global"``, at most
``max_ratio`` of any group). Kept widths are rounded up to a multiple of ``round_to`` channels (fast
CPU kernels want multiples of 8 or 16: odd widths can make a pruned model slower; rounding up never
removes more than asked, so a narrow group may stay whole) and never go below ``min_width``.

Targets: ``target="channels"`` (above) removes channels; ``"latency"`` and ``"macs"`` read ``ratio``
as the share of the model's estimated latency or of its MACs to remove, and let
:mod:`onnxshrink.prune_alloc` choose every group's width (in steps of ``round_to``, at most
``max_ratio`` of a group, never below ``min_width``) to keep the most importance within that budget,
with latency estimated by :mod:`onnxshrink.prune_cost` from a kernel throughput table
(:mod:`onnxshrink.kernel_table`; ``kernels``: ``"default"``, ``"measure"`` or a saved table). Every
plan records its estimate before and after (``settings["estimate"]``) whatever its target; a budgeted
plan also records ``uniform_ratio``, the smallest channels ratio whose uniform plan fits the same
budget, and carries that plan, made from the same scores, as ``plan.uniform`` (not saved;
``onnxshrink.prune`` builds both and keeps the one that drifts less).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxshrink import depgraph, importance
from onnxshrink.errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT = "onnxshrink.prune-plan/1"
TARGETS = ("channels", "latency", "macs")


@dataclasses.dataclass
class GroupPlan:
    id: int
    key: str
    producers: list[str]
    consumers: list[str]
    atoms: int
    channels_per_atom: int
    remove: list[int]
    status: str  # pruned | unchanged | blocked | protected | too narrow
    stops: list[str] = dataclasses.field(default_factory=list)
    scores: list[float] | None = None
    #: Whether a Conv/ConvTranspose reads or writes the group's channels; only then is a multi-channel
    #: atom (an attention head) held to the conv kernels' block (see ``_step``).
    conv: bool = True

    @property
    def kept_channels(self) -> int:
        return (self.atoms - len(self.remove)) * self.channels_per_atom


@dataclasses.dataclass
class PruningPlan:
    settings: dict
    groups: list[GroupPlan]
    #: For a latency or MACs target: the uniform plan (``target="channels"`` at ``uniform_ratio``) made from
    #: the same scores, which ``onnxshrink.prune`` measures against this one. Not saved with the plan.
    uniform: PruningPlan | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "settings": self.settings,
                "groups": [dataclasses.asdict(g) for g in self.groups]}

    @classmethod
    def from_dict(cls, d: Mapping) -> PruningPlan:
        if not isinstance(d, Mapping):
            raise ConfigError(f"not a pruning plan (a JSON {type(d).__name__}, expected an object)")
        if d.get("format") != FORMAT:
            raise ConfigError(f"not a pruning plan (format {d.get('format')!r}, expected {FORMAT!r})")
        try:
            groups = [GroupPlan(**g) for g in d["groups"]]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"pruning plan: malformed group entry: {e}") from e
        for g in groups:
            if not _int_list(g.remove):
                raise ConfigError(f"pruning plan group {g.id}: remove must be distinct atom indices (a list "
                                  f"of integers); got {g.remove!r}")
        return cls(dict(d.get("settings", {})), groups)

    def save(self, path: str | os.PathLike) -> Path:
        from onnxshrink.report import write_json

        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError as e:
            raise ConfigError(f"pruning plan {path}: no such file") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"pruning plan {path}: not JSON: {e}") from e
        except OSError as e:
            raise ConfigError(f"pruning plan {path}: cannot be read: {e}") from e

    @property
    def pruned(self) -> list[GroupPlan]:
        return [g for g in self.groups if g.remove]

    def summary(self) -> dict:
        status: dict[str, int] = {}
        for g in self.groups:
            status[g.status] = status.get(g.status, 0) + 1
        return {"groups": len(self.groups), "status": status, "target": self.target_text(),
                "channels_removed": sum(len(g.remove) * g.channels_per_atom for g in self.groups),
                "estimate": self.settings.get("estimate"), "check": self.settings.get("check")}

    def target_text(self) -> str:
        """What ``ratio`` meant for this plan and what the estimate says, in words."""
        st = self.settings
        target, ratio = st.get("target", "channels"), float(st.get("ratio", 0.0))
        if target != "channels":
            text = _budget_text(target, ratio)
        elif st.get("scope") == "global":
            text = f"channels: the lowest-scoring {ratio:.0%} of all prunable channels (global)"
        else:
            text = f"channels: {ratio:.0%} of each prunable group's (widths rounded up to {st.get('round_to')})"
        est = st.get("estimate") or {}
        lat, macs = est.get("latency_us"), est.get("macs")
        if lat:
            text += (f"; estimated latency {lat[1] / lat[0]:.0%} of unpruned ({lat[0]:,.0f} -> {lat[1]:,.0f} us "
                     f"at batch {est.get('batch', 1)}, kernel table: {est.get('kernels', 'default')})")
        if macs and macs[0]:
            text += f"; MACs {macs[1] / macs[0]:.0%} of unpruned"
        check = st.get("check")
        if check:
            d = {t["plan"]: t["drift"] for t in check["tried"]}
            other = "allocated" if check["kept"] == "uniform" else "uniform"
            asked = (f"asked: {_budget_text(check['asked']['target'], check['asked']['ratio'])}, "
                     if check["kept"] == "uniform" else "")
            text += (f"; {asked}{check['kept']} widths kept: drift "
                     f"{d[check['kept']]:.3g} against {d[other]:.3g} for the {other} widths within the same "
                     f"estimate ({check['feeds']} {'held-out ' if check.get('held_out') else ''}calibration "
                     f"feed{'' if check['feeds'] == 1 else 's'})")
        if not self.groups:
            inner = st.get("subgraph_layers", 0)
            text += ("; nothing to prune: no Conv, ConvTranspose, Gemm or MatMul with a constant float weight "
                     "in the main graph (layers already quantized, e.g. ConvInteger or QLinearConv, are not pruned"
                     + (f"; {inner} weight layers inside If/Loop/Scan bodies are not pruned either" if inner else "")
                     + ")")
        return text


def _budget_text(target: str, ratio: float) -> str:
    return f"{'latency' if target == 'latency' else 'MACs'} budget {1 - ratio:.0%} of unpruned"


def plan_pruning(
    model: ir.Model,
    ratio: float = 0.3,
    *,
    criterion="l1",
    scope: str = "local",
    round_to: int | None = None,
    min_width: int = 8,
    max_ratio: float = 0.9,
    protect: Sequence[str] = (),
    layer_ratios: Mapping[str, float] | None = None,
    stats: importance.ActivationStats | None = None,
    grouped: str = "auto",
    graph: depgraph.DepGraph | None = None,
    target: str = "channels",
    kernels=None,
    dims: Mapping[str, int] | None = None,
) -> PruningPlan:
    """Plan the removal of ``ratio`` of the channels (or of the estimated latency or MACs, ``target``)
    of ``model`` (unchanged). See the module doc.

    ``protect``: glob patterns of node names; a group touching a matching node is left whole.
    ``layer_ratios``: glob pattern of a producer node name -> ratio for its group (overrides ``ratio``;
    channels target only). ``round_to``: None picks :func:`default_round_to` for this CPU.
    ``kernels``: the kernel throughput table for latency estimates (``kernel_table.load``).
    ``dims``: input dims the estimates are taken at (``stats.inferred_shapes``; symbolic ones left
    out count as 1, so give the spatial size of a model whose height and width are symbolic).
    """
    round_to = default_round_to() if round_to is None else int(round_to)
    _check_settings(ratio, scope, round_to, min_width, max_ratio, layer_ratios)
    if target not in TARGETS:
        raise ConfigError(f"pruning target must be one of {', '.join(TARGETS)}, not {target!r}")
    if layer_ratios and target != "channels":
        raise ConfigError("per-layer ratios (layer_ratios) are for target 'channels'; the latency and MACs "
                          "targets choose every group's width themselves (use protect to keep a layer whole)")
    crit = importance.get(criterion)
    dg = graph or depgraph.build(model, grouped=grouped)
    _warn_unmatched(dg, protect, layer_ratios)
    conv_ops = {n.name for n in model.graph.all_nodes() if n.op_type in ("Conv", "ConvTranspose")}
    plans = [_group_plan(g, conv_ops) for g in dg.groups]
    live = []
    for g, gp in zip(dg.groups, plans):
        if g.blocked:
            gp.status = "blocked"
        elif _matches(g, protect):
            gp.status = "protected"
        elif _min_keep(gp, round_to, min_width) >= gp.atoms:
            gp.status = "too narrow"
        else:
            live.append((g, gp, np.asarray(crit(g, stats), dtype=np.float64)))
    cost = _cost_model(model, dg, live, kernels, "macs" if target == "macs" else "latency", dims)
    estimate: dict = {"kernels": cost.table.source, "batch": cost.batch}
    if target != "channels":
        keeps = _budget_keeps(cost, live, ratio, round_to, min_width, max_ratio, crit, estimate)
    elif scope == "global" and not layer_ratios:
        keeps = _global_keeps(live, ratio, round_to, min_width, max_ratio)
    else:
        keeps = [_local_keep(gp, _ratio_for(g, ratio, layer_ratios), round_to, min_width) for g, gp, _ in live]
    settings = {"ratio": ratio, "criterion": getattr(crit, "name", str(criterion)), "scope": scope,
                "round_to": round_to, "min_width": min_width, "max_ratio": max_ratio,
                "protect": list(protect), "layer_ratios": dict(layer_ratios or {}), "grouped": grouped,
                "target": target, "estimate": estimate,
                "subgraph_layers": sum(1 for n in model.graph.all_nodes()
                                       if n.graph is not model.graph and n.op_type in depgraph.WEIGHT_AXES)}
    uniform = None
    r = estimate.get("uniform_ratio")
    if r is not None:  # the same groups and scores, on copies of the group plans
        copies = {id(gp): dataclasses.replace(gp) for gp in plans}
        twins = [(g, copies[id(gp)], scores) for g, gp, scores in live]
        uniform = _fill(cost, twins, [copies[id(gp)] for gp in plans],
                        [_local_keep(gp, r, round_to, min_width) for _, gp, _ in twins],
                        {**settings, "ratio": r, "scope": "local", "target": "channels",
                         "estimate": {"kernels": cost.table.source, "batch": cost.batch}}, round_to, min_width)
    plan = _fill(cost, live, plans, keeps, settings, round_to, min_width, layer_ratios)
    plan.uniform = uniform
    return plan


def _fill(cost, live, plans, keeps, settings, round_to, min_width, layer_ratios=None) -> PruningPlan:
    """The plan that keeps ``keeps`` atoms of each live group (lowest scores removed), with its estimate."""
    estimate = settings["estimate"]
    est = [cost.describe([gp.atoms for _, gp, _ in live]), cost.describe(keeps)]
    estimate.update({k: [est[0][k], est[1][k]] for k in ("latency_us", "macs")})
    _warn_if_slower(estimate, round_to)
    local = settings["target"] == "channels" and not (settings["scope"] == "global" and not layer_ratios)
    for (g, gp, scores), keep in zip(live, keeps):
        order = np.argsort(scores, kind="stable")
        gp.remove = sorted(int(i) for i in order[: gp.atoms - keep])
        gp.status = "pruned" if gp.remove else "unchanged"
        gp.scores = [round(float(s), 6) for s in scores]
        r = _ratio_for(g, settings["ratio"], layer_ratios)
        if local and not gp.remove and r > 0:
            gp.stops = [_kept_whole(gp, r, round_to, min_width)]
    return PruningPlan(settings, plans)


def _cost_model(model, dg, live, kernels, metric, dims=None):
    from onnxshrink import prune_cost

    return prune_cost.build(model, dg, [g for g, _, _ in live], kernels, metric, dims=dims)


def _budget_keeps(cost, live, ratio, round_to, min_width, max_ratio, crit, estimate) -> list[int]:
    """Widths chosen by :func:`onnxshrink.prune_alloc.allocate` within ``1 - ratio`` of the estimate."""
    from onnxshrink import prune_alloc

    cumulative = bool(getattr(crit, "cumulative", False))
    cands = [prune_alloc.Candidate(gp.atoms, _options(gp, round_to, min_width, max_ratio),
                                   prune_alloc.loss_curve(scores, cumulative)) for _, gp, scores in live]
    alloc = prune_alloc.allocate(cost, cands, 1.0 - ratio)
    if not alloc.reached:
        what = "latency" if cost.metric == "latency" else "MACs"
        floor = alloc.after / alloc.before if alloc.before else 1.0
        fixed = (f"; {cost.constant:,.1f} of {alloc.before:,.1f} us is per-run overhead and nodes whose cost "
                 "pruning does not change") if cost.metric == "latency" else ""
        raise ConfigError(
            f"{what} budget {1 - ratio:.0%} of unpruned is out of reach: with every prunable group at its "
            f"smallest width (min_width {min_width}, max_ratio {max_ratio}) the estimate is {floor:.0%}{fixed}. "
            f"Ask for a ratio of at most {max(1 - floor, 0):.2f}, or use target 'channels'")
    estimate.update({"metric": cost.metric, "budget": float(alloc.budget), "reached": True,
                     "uniform_ratio": _uniform_ratio(cost, live, alloc.budget, round_to, min_width, max_ratio)})
    return alloc.keeps


def _uniform_ratio(cost, live, budget: float, round_to: int, min_width: int, max_ratio: float) -> float | None:
    """The smallest channels ratio (a 0.01 grid up to ``max_ratio``) whose uniform plan, the same ratio of
    every group as ``target="channels"`` with ``scope="local"`` removes, the cost model puts within
    ``budget``; None if none. ``onnxshrink.prune`` measures that plan against the allocated one."""
    last = None
    for r in np.arange(1, round(max_ratio * 100) + 1) / 100:
        keeps = [_local_keep(gp, float(r), round_to, min_width) for _, gp, _ in live]
        if keeps != last and cost.total(keeps) <= budget * (1 + 1e-9):
            return float(r)
        last = keeps  # rounding makes runs of ratios keep the same widths: costed once
    return None


def _options(gp: GroupPlan, round_to: int, min_width: int, max_ratio: float) -> list[int]:
    """Kept atoms a budgeted plan may choose for a group: whole, then multiples of the step, descending."""
    step = _step(gp, round_to)
    lowest = max(_min_keep(gp, round_to, min_width),
                 math.ceil((gp.atoms - int(gp.atoms * max_ratio)) / step) * step)
    below = [k for k in range((gp.atoms - 1) // step * step, lowest - 1, -step) if k > 0]
    return [gp.atoms, *below]


def default_round_to() -> int:
    """ONNX Runtime's NCHWc conv block on this CPU (16 with AVX-512, 8 with AVX2; at least 8), asked of
    ONNX Runtime (``onnxshrink.ort_blocks``): other widths fall back to slower kernels or pay for
    padding (``benchmarks/results/prune.md``: widths of 24 ran no faster than 32, and a net pruned to
    widths of 8 ran slower than unpruned)."""
    from onnxshrink.ort_blocks import default_round_to as ort_default

    return ort_default()


def _check_settings(ratio, scope, round_to, min_width, max_ratio, layer_ratios) -> None:
    for r in [ratio, *(layer_ratios or {}).values()]:
        if not 0.0 <= float(r) < 1.0:
            raise ConfigError(f"pruning ratio must be in [0, 1), got {r}")
    if scope not in ("local", "global"):
        raise ConfigError(f"pruning scope must be 'local' or 'global', not {scope!r}")
    if round_to < 0 or min_width < 0 or not 0 < max_ratio < 1:
        raise ConfigError("round_to and min_width must be >= 0 and max_ratio in (0, 1)")


def _group_plan(g: depgraph.Group, conv_ops: set[str]) -> GroupPlan:
    conv = any(n in conv_ops for n in (*g.producers, *g.consumers))
    return GroupPlan(g.id, g.key, g.producers, g.consumers, g.width, g.channels_per_atom(), [],
                     "unchanged", [str(s) for s in g.stops], conv=conv)


def _matches(g: depgraph.Group, patterns: Sequence[str]) -> bool:
    names = [*g.nodes, *g.producers, *g.consumers]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def _int_list(remove) -> bool:
    return isinstance(remove, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in remove)


def _warn_unmatched(dg: depgraph.DepGraph, protect: Sequence[str], layer_ratios) -> None:
    """A ``protect`` or ``layer_ratios`` pattern that names no layer would change nothing: say so
    (a misspelt layer name otherwise prunes the layer the user meant to keep)."""
    example = ", ".join(sorted({p for g in dg.groups for p in g.producers})[:3]) or "none"
    for pattern in protect:
        if not any(_matches(g, [pattern]) for g in dg.groups):
            logger.warning("pruning: protect pattern %r matches no node of a channel group (for example %s)",
                           pattern, example)
    for pattern in layer_ratios or {}:
        if not any(fnmatch.fnmatchcase(p, pattern) for g in dg.groups for p in g.producers):
            logger.warning("pruning: layer_ratios pattern %r matches no producer of a group (for example %s)",
                           pattern, example)


def _ratio_for(g, ratio, layer_ratios) -> float:
    for pattern, r in (layer_ratios or {}).items():
        if any(fnmatch.fnmatchcase(n, pattern) for n in g.producers):
            return float(r)
    return float(ratio)


def _warn_if_slower(estimate: dict, round_to: int) -> None:
    """The plan is kept (the user asked for it), but an estimate above unpruned is said, with the way out."""
    lat = estimate.get("latency_us")
    if lat and lat[0] and lat[1] > 1.02 * lat[0]:
        logger.warning("pruning: the kernel table (%s) estimates the pruned model SLOWER than the unpruned one "
                       "(%.0f%% of its latency at batch %s): ONNX Runtime runs channel counts that are not a "
                       "multiple of its conv block in padded or slower kernels (--round-to %s here). Use "
                       "--prune-target latency (widths chosen by estimated latency) or a larger --round-to; "
                       "--prune-measure times the result", estimate.get("kernels"), 100 * lat[1] / lat[0],
                       estimate.get("batch", 1), round_to)


def _kept_whole(gp: GroupPlan, ratio: float, round_to: int, min_width: int) -> str:
    """Why ``ratio`` of this group removed nothing: its width rounds back up, or the minimum width."""
    width, cpa = gp.atoms * gp.channels_per_atom, gp.channels_per_atom
    left = gp.atoms * (1.0 - ratio) * cpa
    step = _step(gp, round_to) * cpa
    if math.ceil(left / step - 1e-9) * step >= width:
        return (f"{ratio:.0%} of its {width} channels leaves {left:g}, rounded up to a multiple of {step}: "
                f"{width} (a smaller --round-to, or a larger ratio, prunes it)")
    return f"{ratio:.0%} of its {width} channels would go below --min-width {min_width}"


def _step(gp: GroupPlan, round_to: int) -> int:
    """Atoms per rounding step: kept channels stay a multiple of ``round_to``, except for multi-channel
    atoms no conv touches (attention heads feed MatMuls, which have no channel block): one atom a step.
    PP-OCR rec's heads are 15 channels wide; a step of 16 channels would have been 16 of its 8 heads."""
    if not round_to or (gp.channels_per_atom > 1 and not gp.conv):
        return 1
    return round_to // math.gcd(round_to, gp.channels_per_atom)


def _min_keep(gp: GroupPlan, round_to: int, min_width: int) -> int:
    step = _step(gp, round_to)
    need = max(1, math.ceil(min_width / gp.channels_per_atom))
    return max(step, math.ceil(need / step) * step)


def _local_keep(gp: GroupPlan, ratio: float, round_to: int, min_width: int) -> int:
    step = _step(gp, round_to)
    target = gp.atoms * (1.0 - ratio)
    keep = math.ceil(target / step - 1e-9) * step  # rounded up: never remove more than asked
    keep = max(keep, _min_keep(gp, round_to, min_width))
    return min(keep, gp.atoms)


def _global_keeps(live, ratio, round_to, min_width, max_ratio) -> list[int]:
    if not live:
        return []
    norm = [s / s.mean() if s.mean() > 0 else s for _, _, s in live]
    weights = np.concatenate([np.full(gp.atoms, gp.channels_per_atom, float) for _, gp, _ in live])
    flat = np.concatenate(norm)
    order = np.argsort(flat, kind="stable")
    cum = np.cumsum(weights[order])
    cut = np.searchsorted(cum, ratio * weights.sum(), side="right")
    threshold = flat[order[cut - 1]] if cut > 0 else -np.inf
    keeps = []
    for (_, gp, _), s in zip(live, norm):
        removed = int((s <= threshold).sum())
        removed = min(removed, int(gp.atoms * max_ratio))
        keeps.append(_local_keep(gp, removed / gp.atoms, round_to, min_width))
    return keeps


# ---------------------------------------------------------------- resolving a plan against a model


def match_groups(plan: PruningPlan, dg: depgraph.DepGraph) -> list[tuple[depgraph.Group, GroupPlan]]:
    """Pair each planned removal with the model's group of the same key; refuse mismatches."""
    by_key = {g.key: g for g in dg.groups}
    pairs = []
    for gp in plan.groups:
        if not gp.remove:
            continue
        g = by_key.get(gp.key)
        if g is None or g.width != gp.atoms:
            raise ConfigError(
                f"pruning plan group {gp.id} (producers {gp.producers}) does not match this model; "
                "was the plan made for another model or after other rewrites? Re-plan on this model"
            )
        if g.blocked:
            raise ConfigError(f"pruning plan group {gp.id} is blocked in this model: {g.stops[0]}")
        r = gp.remove
        if not (_int_list(r) and all(0 <= i < g.width for i in r) and len(set(r)) == len(r) < g.width):
            raise ConfigError(f"pruning plan group {gp.id}: remove must be distinct atom indices in "
                              f"[0, {g.width}) leaving at least one; got {gp.remove}")
        pairs.append((g, gp))
    return pairs
