"""The ``reconstruction`` criterion: which channels a least-squares refit can best do without.

For every consumer layer of a group (Conv with group 1, Gemm, MatMul with a constant weight), the Gram
matrix ``G = E[x x^T]`` of its input features (conv patches, plus a constant for the bias) is measured
on calibration data (streamed, :func:`collect_grams`). Removing a set S of input features and refitting
the rest optimally raises the output error by ``tr(W_S^T [G^-1]_SS^-1 W_S)`` (the least-squares form
of Optimal Brain Surgeon; He et al. 2017 and ThiNet select channels for the same objective). Atoms are
removed greedily, a few at a time, with ``G^-1`` and ``W`` updated after each step the way the refit
would; outputs are weighted by a following BatchNorm's gain, and each consumer's error is relative to
its output energy. The score of an atom is the cumulative relative error at the step it went, so a
plan removes atoms in the greedy order.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxshrink import data as data_mod
from onnxshrink.depgraph import DepGraph, Group, Slot, weight_axes
from onnxshrink.graph_utils import const_array, int_attr
from onnxshrink.reconstruct_layers import feature_count, gram_bytes

logger = logging.getLogger(__name__)

STEPS = 32  # greedy rounds per group (each removes width / STEPS atoms at least one)


def consumer_layers(group: Group) -> list[tuple[ir.Node, Slot]]:
    """(layer, its input slot in the group) for consumers a refit can handle."""
    by_value = {s.value: s for s in group.slots}
    out = []
    for s in group.slots:
        for use in s.value.uses() if const_array(s.value) is not None else ():
            node = use.node
            axes = weight_axes(node, use.idx)
            if axes is None or s.axes != (axes[1],) or not _refittable(node):
                continue
            x_slot = by_value.get(node.inputs[0])
            if x_slot is not None and node not in [n for n, _ in out]:
                out.append((node, x_slot))
    return out


def _refittable(node: ir.Node) -> bool:
    attr = node.attributes
    if node.op_type == "Conv":
        return int_attr(node, "group", 1) == 1 and len(node.inputs[1].shape or ()) == 4
    if node.op_type == "Gemm":
        return not (attr["transA"].as_int() if "transA" in attr else 0)
    return node.op_type == "MatMul"


def layer_key(node: ir.Node) -> str:
    return node.outputs[0].name or node.name


#: The Gram matrices of all layers are held together (float64, inputs squared), then each group's
#: are inverted (an SVD). A group whose layers would take the total past ``GRAM_BUDGET`` bytes, or
#: has a layer of over ``MAX_GRAM_FEATURES`` inputs, is scored without them (the diagonal form, see
#: ``importance.Reconstruction``), with a warning. A one-off check of the models ``benchmarks/`` uses
#: found at most 239 MiB in all (ddddocr det) and 2,305 inputs (NudeNet); the digits nets' fit is
#: tested. A 12,288-input layer alone would be 1.2 GB, and its SVD minutes.
GRAM_BUDGET = 1 << 30
MAX_GRAM_FEATURES = 4096


def gram_layers(dg: DepGraph, budget: int | None = None, max_features: int | None = None) -> list[ir.Node]:
    """The consumer layers whose Grams are collected: whole groups, in order, within the limits
    (default ``GRAM_BUDGET`` and ``MAX_GRAM_FEATURES``)."""
    budget = GRAM_BUDGET if budget is None else budget
    max_features = MAX_GRAM_FEATURES if max_features is None else max_features
    taken: dict[ir.Node, None] = {}
    total, left_out = 0, []
    for g in dg.groups:
        if g.blocked:
            continue
        nodes = [n for n, _ in consumer_layers(g) if n not in taken]
        feats = [feature_count(n) for n in nodes]
        size = sum(gram_bytes(n) for n in nodes)
        too_wide = [(n, f) for n, f in zip(nodes, feats) if f is None or f > max_features]
        if too_wide or total + size > budget:
            left_out.append((g, too_wide[0] if too_wide else None))
            continue
        taken.update(dict.fromkeys(nodes))
        total += size
    if left_out:
        wide = next((w for _, w in left_out if w is not None), None)
        logger.warning("reconstruction criterion: %d group(s) scored without Gram matrices (%s); their "
                       "channels are ranked by activation variance x weight norm instead",
                       len(left_out), f"{layer_key(wide[0])} has {wide[1]} inputs, over {max_features}"
                       if wide else f"their Grams would take the total over {budget / 2**20:.0f} MiB")
    return list(taken)


def collect_grams(model: ir.Model, dg: DepGraph, feeds, *, max_rows: int = 1024, seed: int = 0) -> dict:
    """Gram matrices (mean of [x, 1]^T [x, 1]) of the inputs of the consumers of unblocked groups,
    within ``GRAM_BUDGET`` (see ``gram_layers``)."""
    from onnxshrink.importance import TapReader
    from onnxshrink.normal_eq import one_blas_thread, products
    from onnxshrink.reconstruct_layers import _make

    nodes = gram_layers(dg)
    if not nodes:
        return {}
    layers = [_make(n, n.inputs[0]) for n in nodes]
    read = TapReader(model, [layer.x for layer in layers])
    rng = np.random.default_rng(seed)
    grams: dict[str, list] = {}
    for feed in data_mod.feeds(feeds, model):
        arrays = read(feed)
        with one_blas_thread():
            for layer, x in zip(layers, arrays):
                f = layer.features(x)
                if len(f) > max_rows:
                    f = f[rng.choice(len(f), max_rows, replace=False)]
                f = np.concatenate([f, np.ones((len(f), 1), f.dtype)], axis=1).astype(np.float32)
                acc = grams.setdefault(layer_key(layer.node), [None, 0])
                prod = products(f)  # float32 where it did not overflow: summed in float64, in place
                if acc[0] is None:
                    acc[0] = prod.astype(np.float64)
                else:
                    np.add(acc[0], prod, out=acc[0])
                acc[1] += len(f)
    out = {}
    for k, (g, n) in grams.items():
        if np.isfinite(g).all():
            out[k] = g / max(n, 1)
        else:
            logger.warning("reconstruction criterion: the input of %s is not finite (Inf or NaN) on the "
                           "calibration data; its groups are scored without it", k)
    return out



def _features_of(node: ir.Node, x_slot: Slot, cells: np.ndarray) -> np.ndarray:
    """Feature indices (rows of the refit weight) of the given input cells."""
    if node.op_type == "Conv":
        k = int(np.prod(const_array(node.inputs[1]).shape[2:]))
        return (cells[:, None] * k + np.arange(k)[None, :]).reshape(-1)
    return cells


def _weights(node: ir.Node) -> np.ndarray:
    """[features + 1, outputs] of a layer, outputs scaled by a following BatchNorm's gain."""
    from onnxshrink.reconstruct_layers import _make

    w = _make(node, node.inputs[0]).current_solution()
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "BatchNormalization" and uses[0].idx == 0:
        bn = uses[0].node
        scale, var = const_array(bn.inputs[1]), const_array(bn.inputs[4])
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        if scale is not None and var is not None and scale.size == w.shape[1]:
            w = w * (np.abs(scale) / np.sqrt(var + eps))[None, :]
    return w


class _Consumer:
    def __init__(self, gram: np.ndarray, w: np.ndarray, blocks: list[np.ndarray]) -> None:
        lam = 1e-4 * max(float(np.trace(gram)) / len(gram), 1e-12)
        self.ginv = np.linalg.pinv(gram + lam * np.eye(len(gram)))
        self.w = w
        self.blocks = blocks  # per atom, feature indices
        self.energy = max(float(np.trace(w.T @ gram @ w)), 1e-12)

    def cost(self, atom: int) -> float:
        s = self.blocks[atom]
        ws = self.w[s]
        try:
            sol = np.linalg.solve(self.ginv[np.ix_(s, s)], ws)
        except np.linalg.LinAlgError:
            return float("inf")
        return float((ws * sol).sum()) / self.energy

    def remove(self, atoms: list[int]) -> None:
        s = np.concatenate([self.blocks[a] for a in atoms])
        gss = self.ginv[np.ix_(s, s)]
        k = np.linalg.solve(gss, self.ginv[s])  # [|s|, F]
        self.w = self.w - self.ginv[:, s] @ np.linalg.solve(gss, self.w[s])
        self.ginv = self.ginv - self.ginv[:, s] @ k
        self.w[s] = 0.0
        self.ginv[s] = 0.0
        self.ginv[:, s] = 0.0
        for i in s:
            self.ginv[i, i] = 1.0  # removed features no longer couple


def greedy_scores(group: Group, grams: dict) -> np.ndarray | None:
    """Cumulative relative output error at the greedy step each atom is removed (None: no data)."""
    consumers = []
    for node, x_slot in consumer_layers(group):
        gram = grams.get(layer_key(node))
        if gram is None:
            continue
        blocks = [_features_of(node, x_slot, a[x_slot]) for a in group.atoms]
        consumers.append(_Consumer(gram, _weights(node), blocks))
    if not consumers:
        return None
    n = group.width
    alive = list(range(n))
    scores = np.zeros(n)
    total, per_step = 0.0, max(1, n // STEPS)
    while len(alive) > 1:
        costs = np.array([sum(c.cost(a) for c in consumers) for a in alive])
        take = min(per_step, len(alive) - 1)
        order = np.argsort(costs, kind="stable")[:take]
        chosen = [alive[i] for i in order]
        for c in consumers:
            c.remove(chosen)
        for i in order:
            total += max(costs[i], 0.0)
            scores[alive[i]] = total
        alive = [a for a in alive if a not in chosen]
    scores[alive[0]] = total + 1.0 + total
    return scores
