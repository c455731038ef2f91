"""Structured channel pruning: apply a pruning plan (``onnxshrink.prune_plan``) to a model.

The pass rebuilds the dependency graph (``onnxshrink.depgraph``), matches the plan's groups by key,
and removes every cell of every removed atom from every slot:

1. constant weights, biases and BatchNormalization parameters are sliced along their slot axes;
2. intermediate value shapes shrink on the same axes (graph inputs and outputs are never in a
   prunable group, so the interface cannot change);
3. ops that spell channel counts are rewritten: Conv/ConvTranspose ``group`` (whole-group pruning of
   depthwise convs), Split sizes, Slice starts/ends and scalar Gather indices on the channel axis,
   and Reshape target entries (the head count of an attention reshape, also in a packed q/k/v
   reshape ``[.., 3, H, d]``, in a constant or a constant piece of a Concat; a new initializer is
   made, shared constants are never edited in place).

Without a plan in its config the pass plans with a data-free criterion (``l1``/``l2``/``bn``); data
criteria and reconstruction need calibration data and run through ``onnxshrink.prune(...)``.
Refuses (ConfigError) a plan whose groups do not match the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxshrink import depgraph
from onnxshrink.channel_layout import shape_entries, slice_spec
from onnxshrink.errors import PassFailure
from onnxshrink.graph_utils import NameGen, add_initializer, const_array, int_attr
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass
from onnxshrink.prune_plan import PruningPlan, match_groups, plan_pruning

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.3
    criterion: str = "l1"
    scope: str = "local"
    target: str = "channels"  # channels | latency | macs: what ``ratio`` of is removed (prune_plan)
    kernels: str | None = None  # kernel throughput table for latency estimates: default | measure | path
    round_to: int | None = None  # None: ONNX Runtime's NCHWc block here, >= 8 (ort_blocks.default_round_to)
    min_width: int = 8
    protect: tuple[str, ...] = ()
    grouped: str = "auto"
    #: apply this plan (a PruningPlan, or the path of its JSON) instead of planning
    plan: object = None
    #: the dependency graph the caller built of this model for planning (used only when its ``model``
    #: is the model this pass runs on; else, or with None, the pass builds its own)
    graph: object = None


class PruneChannelsPass(ShrinkPass):
    """Remove whole channels, filters, hidden units and attention heads (structured pruning)."""

    name = "prune_channels"
    Config = PruneConfig
    changes = Changes.WEIGHTS | Changes.SHAPES | Changes.NUMERICS
    lossy = True

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        cfg = self.config
        plan = cfg.plan
        if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__"):
            plan = PruningPlan.load(plan)
        grouped = plan.settings.get("grouped", "auto") if plan is not None else cfg.grouped
        dg = cfg.graph
        if dg is None or dg.model is not model or dg.ctx.grouped != grouped:
            dg = depgraph.build(model, grouped=grouped)
        if plan is None:
            plan = plan_pruning(model, cfg.ratio, criterion=cfg.criterion, scope=cfg.scope,
                                round_to=cfg.round_to, min_width=cfg.min_width, protect=cfg.protect,
                                grouped=cfg.grouped, graph=dg, target=cfg.target, kernels=cfg.kernels)
        kept = apply_plan(model, dg, plan, stats)
        stats.notes["plan"] = plan.summary()
        stats.notes["kept"] = {name: {str(a): idx for a, idx in axes.items()} for name, axes in kept.items()}


def apply_plan(model: ir.Model, dg: depgraph.DepGraph, plan: PruningPlan, stats: PassStats) -> dict:
    """Slice and rewrite ``model`` for ``plan``; returns kept indices: value name -> axis -> list."""
    pairs = match_groups(plan, dg)
    removed: dict[depgraph.Slot, list[np.ndarray]] = defaultdict(list)
    for g, gp in pairs:
        for i in gp.remove:
            for slot, cells in g.atoms[i].items():
                removed[slot].append(cells)
        stats.add("groups_pruned")
        stats.add("channels_pruned", len(gp.remove) * gp.channels_per_atom)
    per_value = _axis_removals(removed, dg.ctx)
    old = {v: dg.ctx.shape(v) for v in per_value}
    kept: dict[ir.Value, dict[int, np.ndarray]] = {}
    for v, axes in per_value.items():
        kept[v] = {a: np.setdiff1d(np.arange(old[v][a]), np.asarray(sorted(r))) for a, r in axes.items()}
    nodes = {u.node for v in kept for u in v.uses()} | {v.producer() for v in kept if v.producer()}
    names = NameGen(model)
    _fix_nodes(model, [n for n in model.graph if n in nodes], kept, dg.ctx, names, stats)
    for v, axes in kept.items():
        _shrink_value(v, axes, stats)
    return {depgraph.value_name(v): {a: idx.tolist() for a, idx in axes.items()} for v, axes in kept.items()}


def _axis_removals(removed, ctx) -> dict[ir.Value, dict[int, set]]:
    """Per value and axis, the indices removed, from cells of (possibly compound) slots."""
    out: dict[ir.Value, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    for slot, chunks in removed.items():
        cells = np.unique(np.concatenate(chunks))
        dims = ctx.dims(slot.value, slot.axes)
        if len(slot.axes) == 1:
            out[slot.value][slot.axes[0]].update(int(c) for c in cells)
            continue
        coords = np.unravel_index(cells, dims)
        for p, axis in enumerate(slot.axes):
            hit = np.unique(coords[p])
            if len(cells) == len(hit) * int(np.prod(dims)) // dims[p]:
                out[slot.value][axis].update(int(c) for c in hit)
                break
        else:
            raise PassFailure(f"prune_channels: removed cells of {slot.label()} are not whole rows of "
                              "one axis (the kept set would not be a box); please report this model")
    return out


def _shrink_value(v: ir.Value, axes: dict[int, np.ndarray], stats: PassStats) -> None:
    if isinstance(v.const_value, ir.ExternalTensor) and not v.is_graph_input():
        _shrink_lazily(v, sorted(axes.items()), stats)
        return
    arr = const_array(v)
    if arr is not None:
        before = arr.size
        for a, idx in sorted(axes.items()):
            arr = np.take(arr, idx, axis=a)
        _set_const(v, arr)
        stats.add("parameters_removed", before - arr.size)
        return
    if v.shape is not None:
        dims = list(v.shape)
        for a, idx in axes.items():
            dims[a] = len(idx)
        v.shape = ir.Shape(dims)


def _shrink_lazily(v: ir.Value, axes: list[tuple[int, np.ndarray]], stats: PassStats) -> None:
    """A weight read from external data (memory-mapped) is sliced when it is read, by the save that
    writes it or a later pass, never held whole: pruning a model over 2 GB keeps no copy of its
    weights in memory."""
    src = v.const_value
    dims = list(src.shape)
    for a, idx in axes:
        dims[a] = len(idx)

    def sliced() -> ir.Tensor:
        arr = src.numpy()
        for a, idx in axes:
            arr = np.take(arr, idx, axis=a)
        return ir.tensor(np.ascontiguousarray(arr), name=v.name)

    v.const_value = ir.LazyTensor(sliced, dtype=src.dtype, shape=ir.Shape(dims), name=v.name)
    v.shape = ir.Shape(dims)
    stats.add("parameters_removed", src.size - int(np.prod(dims)))


def _set_const(v: ir.Value, arr: np.ndarray) -> None:
    tensor = ir.tensor(np.ascontiguousarray(arr), name=v.name)
    prod = v.producer()
    if prod is not None and prod.op_type == "Constant":
        for key in list(prod.attributes):
            del prod.attributes[key]
        prod.attributes["value"] = ir.AttrTensor("value", tensor)
    v.const_value = tensor
    v.dtype = tensor.dtype
    v.shape = ir.Shape(arr.shape)


# ---------------------------------------------------------------- ops that spell channel counts


def _new_dim(v, axis, kept, ctx) -> int:
    if v in kept and axis in kept[v]:
        return len(kept[v][axis])
    return ctx.shape(v)[axis]


def _fix_nodes(model, nodes, kept, ctx, names, stats) -> None:
    reshapes = []
    for node in nodes:
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            _fix_group(node, kept, ctx, stats)
        elif op == "Split":
            _fix_split(model, node, kept, ctx, names)
        elif op == "Slice":
            _fix_slice(model, node, kept, ctx, names)
        elif op == "Gather":
            _fix_gather(model, node, kept, ctx, names)
        elif op == "Reshape" and node.outputs[0] in kept:
            reshapes.append(node)
    _fix_reshapes(model, reshapes, kept, ctx, names, stats)


def _fix_group(node, kept, ctx, stats) -> None:
    g = int_attr(node, "group", 1)
    x = node.inputs[0]
    if g == 1 or x not in kept or 1 not in kept[x]:
        return
    old_cin = ctx.shape(x)[1]
    if node.op_type == "Conv":
        per_group = len(kept[node.inputs[1]][1]) if node.inputs[1] in kept and 1 in kept[node.inputs[1]] \
            else ctx.shape(node.inputs[1])[1]
    else:
        per_group = old_cin // g
    new_g = len(kept[x][1]) // per_group
    if new_g != g:
        node.attributes["group"] = ir.AttrInt64("group", new_g)
        stats.add("conv_groups_removed", g - new_g)


def _fix_split(model, node, kept, ctx, names) -> None:
    axis = node.attributes.get("axis")
    rank = len(ctx.shape(node.inputs[0]))
    axis = axis.as_int() if axis is not None else 0
    axis = axis + rank if axis < 0 else axis
    sizes = [_new_dim(o, axis, kept, ctx) for o in node.outputs]
    old = [ctx.shape(o)[axis] for o in node.outputs]
    if sizes == old:
        return
    arr = np.array(sizes, dtype=np.int64)
    if "split" in node.attributes:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
    elif len(node.inputs) > 1 and node.inputs[1] is not None or _opset(model) >= 13:
        if len(node.inputs) < 2:
            node.resize_inputs(2)
        node.replace_input_with(1, add_initializer(model.graph, arr, names(f"{node.name or 'split'}_sizes")))
        node.attributes.pop("num_outputs", None)
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)


def _opset(model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17)))


def _fix_slice(model, node, kept, ctx, names) -> None:
    x = node.inputs[0]
    if x not in kept:
        return
    spec = slice_spec(node, ctx.shape(x))
    starts = const_array(node.inputs[1]).astype(np.int64).reshape(-1).copy()
    ends = const_array(node.inputs[2]).astype(np.int64).reshape(-1).copy()
    axes_v = node.inputs[3] if len(node.inputs) > 3 else None
    axes = list(range(len(starts))) if axes_v is None else [int(a) for a in const_array(axes_v).reshape(-1)]
    rank = len(ctx.shape(x))
    changed = False
    for i, a in enumerate(axes):
        a = a + rank if a < 0 else a
        if a not in kept[x]:
            continue
        s, e, _ = spec[a]
        idx = kept[x][a]
        starts[i], ends[i] = int((idx < s).sum()), int((idx < e).sum())
        changed = True
    if changed:
        base = node.name or "slice"
        node.replace_input_with(1, add_initializer(model.graph, starts, names(f"{base}_starts")))
        node.replace_input_with(2, add_initializer(model.graph, ends, names(f"{base}_ends")))


def _fix_gather(model, node, kept, ctx, names) -> None:
    """A scalar index on a pruned axis moves to its kept position (the depgraph allows only those)."""
    x = node.inputs[0]
    axis = node.attributes.get("axis")
    axis = axis.as_int() if axis is not None else 0
    axis = axis + len(ctx.shape(x)) if axis < 0 else axis
    if x not in kept or axis not in kept[x]:
        return
    index = int(const_array(node.inputs[1])) % ctx.shape(x)[axis]
    pos = np.flatnonzero(kept[x][axis] == index)
    if not len(pos):
        raise PassFailure(f"prune_channels: Gather {node.name!r} picks index {index}, which the plan "
                          "removes; please report this model")
    if pos[0] != index:
        new = add_initializer(model.graph, np.array(pos[0], np.int64), names(f"{node.name or 'gather'}_index"))
        node.replace_input_with(1, new)


def _fix_reshapes(model, reshapes, kept, ctx, names, stats) -> None:
    """Write the new channel counts (head counts) into Reshape targets, once per constant holder."""
    wanted: dict[ir.Value, dict[int, int]] = defaultdict(dict)
    holders: dict[ir.Value, list[ir.Node]] = defaultdict(list)
    for node in reshapes:
        y = node.outputs[0]
        entries = shape_entries(node, ctx.shapes)
        for axis in kept[y]:
            e = entries[axis]
            if e.value in (-1, 0):
                continue
            if e.value is None or e.holder is None:
                raise PassFailure(f"prune_channels: Reshape {node.name!r} target entry {axis} is not a constant")
            new = len(kept[y][axis])
            if wanted[e.holder].get(e.index, new) != new:
                raise PassFailure(f"prune_channels: Reshape targets sharing {e.holder.name!r} need "
                                  "different channel counts")
            wanted[e.holder][e.index] = new
            if node not in holders[e.holder]:
                holders[e.holder].append(node)
    for holder, changes in wanted.items():
        arr = const_array(holder).astype(np.int64).copy()
        flat = arr.reshape(-1)
        for i, val in changes.items():
            flat[i] = val
        new_v = add_initializer(model.graph, arr, names(f"{holder.name or 'shape'}_pruned"))
        for use in list(holder.uses()):
            if use.node in holders[holder] or (use.node.op_type == "Concat" and any(
                    r.inputs[1] is use.node.outputs[0] for r in holders[holder])):
                use.node.replace_input_with(use.idx, new_v)
        stats.add("reshape_targets_rewritten")
