"""Budgeted width allocation across pruning groups: latency- or MACs-constrained (in the spirit of HALP).

Each live group comes with the widths it may keep (:attr:`Candidate.options`: unpruned, then multiples
of the rounding step down to the smallest allowed by the minimum width and ``max_ratio``) and a loss
curve (``loss[k]``: importance lost when its ``k`` lowest-scoring atoms go, nondecreasing, see
:func:`loss_curve`). Starting from the unpruned widths, while the cost model's estimate is above the
budget the allocator takes the move (one group down by one to :data:`LOOKAHEAD` steps) that loses the
least importance per unit of cost saved. A move that saves nothing is never taken; moves over
several steps let it cross widths where a kernel slows down. Then it gives steps back, the most
importance regained first, while the estimate stays within the budget. Ties go to the larger saving,
then to the lower group index, so the result is deterministic. If every group reaches its smallest
width first, the budget is reported as not reached.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxshrink.prune_cost import CostModel

LOOKAHEAD = 4  # steps one move may take at once


@dataclasses.dataclass
class Candidate:
    atoms: int
    options: list[int]  # kept atoms allowed, descending, options[0] == atoms
    loss: np.ndarray  # loss[k]: importance lost with k atoms removed, k = 0..atoms


@dataclasses.dataclass
class Allocation:
    keeps: list[int]
    before: float
    after: float
    budget: float
    reached: bool


def loss_curve(scores: np.ndarray, cumulative: bool = False) -> np.ndarray:
    """Importance lost per number of atoms removed (lowest scores first).

    Additive scores (magnitudes, activations): the removed atoms' share of the group's total score,
    so every group holds 1 in all. Cumulative scores (the ``reconstruction`` criterion: the relative
    output error left once an atom and every lower-scoring one are gone): the score itself.
    """
    s = np.sort(np.maximum(np.asarray(scores, dtype=np.float64), 0.0), kind="stable")
    if cumulative:
        return np.concatenate([[0.0], s])  # sorted: already nondecreasing
    total = s.sum()
    if total <= 0:
        return np.linspace(0.0, 1.0, len(s) + 1)
    return np.concatenate([[0.0], np.cumsum(s) / total])


def allocate(model: CostModel, cands: list[Candidate], fraction: float) -> Allocation:
    """Kept atoms per candidate so the estimate is at most ``fraction`` of the unpruned one."""
    keep = [c.atoms for c in cands]
    pos = [0] * len(cands)
    costs = model.layer_costs(keep)
    before = model.constant + float(costs.sum())
    budget = fraction * before
    total = before
    while total > budget * (1 + 1e-9):
        move = _best_cut(model, cands, keep, pos, costs)
        if move is None:
            break
        total -= _take(move, cands, keep, pos, costs)
    while (move := _best_give_back(model, cands, keep, pos, costs, budget - total)) is not None:
        total += _take(move, cands, keep, pos, costs)
    total = model.constant + float(costs.sum())
    return Allocation(keep, before, total, budget, total <= budget * (1 + 1e-9))


def _take(move, cands, keep, pos, costs) -> float:
    """Apply a move (group, option index, new layer costs, change) in place; returns its change."""
    i, p, new, change = move
    keep[i], pos[i] = cands[i].options[p], p
    for j, v in new.items():
        costs[j] = v
    return change


def _lost(c: Candidate, old: int, new: int) -> float:
    return float(c.loss[c.atoms - new] - c.loss[c.atoms - old])


def _best_cut(model, cands, keep, pos, costs):
    best = None
    for i, c in enumerate(cands):
        for p in range(pos[i] + 1, min(pos[i] + 1 + LOOKAHEAD, len(c.options))):
            d, new = model.delta(keep, costs, i, c.options[p])
            saved = -d
            if saved <= 1e-12:
                continue
            key = (_lost(c, keep[i], c.options[p]) / saved, -saved, i)
            if best is None or key < best[0]:
                best = (key, i, p, new, saved)
    return None if best is None else best[1:]


def _best_give_back(model, cands, keep, pos, costs, room: float):
    best = None
    for i, c in enumerate(cands):
        if pos[i] == 0:
            continue
        p = pos[i] - 1
        d, new = model.delta(keep, costs, i, c.options[p])
        if d > room + 1e-9 * max(abs(room), 1.0):
            continue
        key = (-_lost(c, c.options[p], keep[i]), d, i)
        if best is None or key < best[0]:
            best = (key, i, p, new, d)
    return None if best is None else best[1:]
