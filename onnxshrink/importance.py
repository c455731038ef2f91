"""Channel importance for pruning: one score per atom of a dependency group (higher = keep).

An importance is anything with ``name``, ``needs_data`` and ``__call__(group, stats) -> scores``
(:class:`Importance`); ``CRITERIA`` is the explicit table of the built-in ones:

- ``l1`` / ``l2``: weight magnitude summed over every weight slice in the group (the producers' rows and
  the consumers' columns), each slice normalized by its mean so no layer dominates by scale;
- ``bn``: |gamma| of the group's BatchNormalization scales (l1 when the group has none);
- ``activation``: mean |activation| on calibration data at the consumers' inputs;
- ``reconstruction``: the output error a consumer layer takes when a channel is removed and its mean
  is folded into the bias, Var[x_c] * ||W[:, c]||^2 (ThiNet/He et al.'s criterion, diagonal form).

Data criteria read :class:`ActivationStats` collected by :func:`collect_stats`, which streams
calibration batches through ONNX Runtime with tapped outputs (``onnxshrink.calib_taps``) and keeps only
per-channel sums, never the activations.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import numpy as np
import onnx_ir as ir

from onnxshrink import data as data_mod
from onnxshrink.depgraph import DepGraph, Group, Slot, is_const, weight_axes
from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import const_array

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ActivationStats:
    """Per-cell statistics of activation slots, keyed by slot label (JSON-friendly)."""

    samples: int
    mean: dict[str, np.ndarray]
    abs_mean: dict[str, np.ndarray]
    sq_mean: dict[str, np.ndarray]
    grams: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # consumer input Grams

    def var(self, label: str) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):  # Inf activations: NaN, and callers check
            return np.maximum(self.sq_mean[label] - self.mean[label] ** 2, 0.0)


class Importance(Protocol):
    name: str
    needs_data: bool

    def __call__(self, group: Group, stats: ActivationStats | None) -> np.ndarray: ...


def _per_atom(group: Group, slot: Slot, per_cell: np.ndarray) -> np.ndarray:
    return np.array([per_cell[a[slot]].sum() for a in group.atoms], dtype=np.float64)


def _normalized_sum(parts: list[np.ndarray], width: int) -> np.ndarray:
    total = np.zeros(width)
    for p in parts:
        mean = p.mean()
        if mean > 0:
            total += p / mean
    return total


def weight_slots(group: Group) -> list[tuple[Slot, ir.Node, int]]:
    """Constant weight slots of weight ops in the group: (slot, op, input index)."""
    out = []
    for s in group.slots:
        if not is_const(s.value):
            continue
        for use in s.value.uses():
            axes = weight_axes(use.node, use.idx)
            if axes is not None and s.axes[0] in axes and len(s.axes) == 1:
                out.append((s, use.node, use.idx))
    return out


#: Elements of a weight converted to float64 at a time by :func:`cell_norms`.
NORM_CHUNK = 1 << 21


def cell_norms(slot: Slot, p: int) -> np.ndarray:
    """Sum of ``|w|**p`` per index of the slot's axis, over blocks of the weight's leading axis: the
    float64 copies stay near :data:`NORM_CHUNK` elements (16 MiB), not several times the weight."""
    w = const_array(slot.value)
    axis = slot.axes[0]
    if w.ndim < 2:
        return np.abs(w.astype(np.float64)) ** p
    out = np.zeros(w.shape[axis], np.float64)
    step = max(1, NORM_CHUNK // max(1, w[0].size))
    for start in range(0, w.shape[0], step):
        part = np.abs(w[start:start + step].astype(np.float64))
        if p != 1:
            part **= p
        if axis == 0:
            out[start:start + step] = part.reshape(part.shape[0], -1).sum(axis=1)
        else:
            out += np.moveaxis(part, axis, 0).reshape(w.shape[axis], -1).sum(axis=1)
    return out


@dataclasses.dataclass(frozen=True)
class Magnitude:
    """L1 (p=1) or L2 (p=2) weight magnitude of every weight slice in the group."""

    p: int = 1
    name: str = "l1"
    needs_data: bool = False

    def __call__(self, group: Group, stats=None) -> np.ndarray:
        parts = [_per_atom(group, s, cell_norms(s, self.p)) for s, _, _ in weight_slots(group)]
        if self.p == 2:
            parts = [np.sqrt(x) for x in parts]
        return _normalized_sum(parts, group.width)


@dataclasses.dataclass(frozen=True)
class BNScale:
    """|gamma| of the group's BatchNormalization scales; L1 magnitude when there is none."""

    name: str = "bn"
    needs_data: bool = False

    def __call__(self, group: Group, stats=None) -> np.ndarray:
        parts = []
        for s in group.slots:
            if not is_const(s.value):
                continue
            if any(u.node.op_type == "BatchNormalization" and u.idx == 1 for u in s.value.uses()):
                parts.append(_per_atom(group, s, np.abs(const_array(s.value).astype(np.float64))))
        if not parts:
            return Magnitude()(group)
        return _normalized_sum(parts, group.width)


def consumer_inputs(group: Group) -> list[tuple[Slot, Slot | None]]:
    """(data slot, weight in-slot) of each consumer layer reading the group's channels."""
    by_value = {s.value: s for s in group.slots if not is_const(s.value)}
    pairs = []
    for w_slot, node, idx in weight_slots(group):
        axes = weight_axes(node, idx)
        if w_slot.axes != (axes[1],):
            continue
        x_slot = by_value.get(node.inputs[0])
        if x_slot is not None:
            pairs.append((x_slot, w_slot))
    return pairs


@dataclasses.dataclass(frozen=True)
class MeanActivation:
    """Mean |activation| at the consumers' inputs on calibration data."""

    name: str = "activation"
    needs_data: bool = True

    def __call__(self, group: Group, stats: ActivationStats | None) -> np.ndarray:
        stats = _need(stats, self.name)
        parts = [_per_atom(group, x, stats.abs_mean[x.label()]) for x, _ in consumer_inputs(group)
                 if x.label() in stats.abs_mean]
        return _normalized_sum(parts, group.width) if parts else Magnitude()(group)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """The output error a least-squares refit is left with after the channel goes, chosen greedily
    with consumer Gram matrices (``importance_lsq``); without Grams, the diagonal form
    Var[x_c] * ||W[:, c]||^2 (the error of removing c with its mean folded into the bias), made
    cumulative as a share of the group's total. Scores are cumulative (``cumulative``): an atom's
    score is the loss once it and every lower-scoring atom are gone, comparable across groups."""

    name: str = "reconstruction"
    needs_data: bool = True
    needs_grams: bool = True
    cumulative: bool = True

    def __call__(self, group: Group, stats: ActivationStats | None) -> np.ndarray:
        from onnxshrink.importance_lsq import greedy_scores

        stats = _need(stats, self.name)
        if stats.grams:
            scores = greedy_scores(group, stats.grams)
            if scores is not None:
                return scores
        parts = []
        for x, w in consumer_inputs(group):
            if x.label() not in stats.sq_mean:
                continue
            var, norms = stats.var(x.label()), cell_norms(w, 2)
            if len(var) == len(norms) and np.isfinite(var).all():  # Inf/NaN activations tell nothing
                parts.append(_per_atom(group, x, var * norms))
        return _cumulative(_normalized_sum(parts, group.width) if parts else Magnitude(2, "l2")(group))


def _cumulative(scores: np.ndarray) -> np.ndarray:
    """Additive scores as cumulative shares of their total, in the same order (lowest first)."""
    order = np.argsort(scores, kind="stable")
    total = float(scores.sum())
    out = np.empty(len(scores))
    out[order] = np.cumsum(scores[order]) / (total if total > 0 else 1.0)
    return out


def _need(stats, name):
    if stats is None:
        raise ConfigError(f"pruning criterion {name!r} needs calibration data (--calibration DATA)")
    return stats


#: The explicit table of built-in criteria.
CRITERIA: dict[str, Importance] = {
    "l1": Magnitude(1, "l1"),
    "l2": Magnitude(2, "l2"),
    "bn": BNScale(),
    "activation": MeanActivation(),
    "reconstruction": Reconstruction(),
}


def get(criterion) -> Importance:
    if not isinstance(criterion, str):
        return criterion
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown pruning criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    return CRITERIA[criterion]


# ---------------------------------------------------------------- statistics from calibration data


def stat_slots(dg: DepGraph) -> list[Slot]:
    """The activation slots data criteria read: consumer inputs of every unblocked group."""
    seen, out = set(), []
    for g in dg.groups:
        if g.blocked:
            continue
        for x, _ in consumer_inputs(g):
            if x not in seen:
                seen.add(x)
                out.append(x)
    return out


def collect(model: ir.Model, dg: DepGraph, feeds, criterion: Importance, progress=None) -> ActivationStats | None:
    """The statistics ``criterion`` needs (None for data-free criteria). ``progress``: a bar on stderr
    (True) or ``fn(done, total)`` over the feeds read (one pass, two for ``reconstruction``)."""
    if not criterion.needs_data:
        return None
    from onnxshrink.progress import make_progress

    grams = getattr(criterion, "needs_grams", False)
    source = data_mod.feeds(feeds, model)
    bar = make_progress(progress, source.count * (1 + grams) if source.count else None,
                        "pruning statistics", unit="feeds")
    source = source.ticking(bar.update)
    try:
        stats = collect_stats(model, stat_slots(dg), source)
        if grams:
            from onnxshrink.importance_lsq import collect_grams

            stats.grams = collect_grams(model, dg, source)
    finally:
        bar.close()
    return stats


def collect_stats(model: ir.Model, slots: list[Slot], feeds, *, providers=None) -> ActivationStats:
    """Stream ``feeds`` through ONNX Runtime and reduce each slot's value to per-cell mean, mean |x|
    and mean x^2 (over every other axis). Holds one feed's taps at a time."""
    values = list(dict.fromkeys(s.value for s in slots))
    if not values:
        return ActivationStats(0, {}, {}, {})
    read = TapReader(model, values, providers)
    sums = {s.label(): [0.0, 0.0, 0.0, 0] for s in slots}
    for feed in data_mod.feeds(feeds, model):
        arrays = dict(zip(values, read(feed)))
        for s in slots:
            cells = _cells_last(arrays[s.value], s.axes).astype(np.float64)
            acc = sums[s.label()]
            acc[0] = acc[0] + cells.sum(0)
            acc[1] = acc[1] + np.abs(cells).sum(0)
            acc[2] = acc[2] + (cells**2).sum(0)
            acc[3] += cells.shape[0]
    n = next(iter(sums.values()))[3]
    return ActivationStats(
        n,
        {k: np.asarray(v[0]) / max(v[3], 1) for k, v in sums.items()},
        {k: np.asarray(v[1]) / max(v[3], 1) for k, v in sums.items()},
        {k: np.asarray(v[2]) / max(v[3], 1) for k, v in sums.items()},
    )


class TapReader:
    """The arrays of ``values`` per feed, from one ONNX Runtime session of a tap model
    (``calib_taps.plan_taps``; a value listed twice is tapped once). Small on purpose: to be merged
    with the calibration engine's runner once its batching API settles."""

    def __init__(self, model: ir.Model, values: list[ir.Value], providers=None, threads: int = 1) -> None:
        from onnxshrink import calib_taps, runtime

        unique = list(dict.fromkeys(values))
        self.index = [unique.index(v) for v in values]
        self.plan = calib_taps.plan_taps(model, unique, trim=True)
        self.session = None
        if self.plan.model is not None:
            rt = runtime.ort()
            so = runtime.session_options(threads, level=rt.GraphOptimizationLevel.ORT_ENABLE_BASIC)
            self.session = runtime.make_session(self.plan.model, providers, options=so)

    def __call__(self, feed) -> list[np.ndarray]:
        outs = self.session.run(None, feed) if self.session is not None else []
        got = [feed[t.feed] if t.feed is not None else outs[t.output] for t in self.plan.taps]
        return [got[i] for i in self.index]


def _cells_last(arr: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``arr`` as [rows, cells]: the slot axes moved last (in slot order) and flattened."""
    rest = [a for a in range(arr.ndim) if a not in axes]
    moved = np.transpose(arr, rest + list(axes))
    ncells = int(np.prod([arr.shape[a] for a in axes]))
    return moved.reshape(-1, ncells)
