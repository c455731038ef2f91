"""Cells and atoms of the pruning dependency graph.

Every slot's cells get a global index; each edge's index map joins cells; the connected components of
cells (a numpy union-find) are the atoms. A compound slot (a head split ``(H, d)``, a channel shuffle)
must lose whole rows of one of its axes, so the kept cells stay a box (a product of per-axis index
sets); when its atoms are not already closed along one axis, cells sharing a coordinate on its first
axis are joined, and the union is redone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: networkx is imported where a graph is built
    import networkx as nx


def offsets(graph: nx.Graph) -> tuple[dict, int]:
    out, total = {}, 0
    for s in graph.nodes:
        out[s] = total
        total += int(np.prod(graph.nodes[s]["dims"] or (0,)))
    return out, total


def edge_arrays(graph: nx.Graph, links, offs) -> tuple[np.ndarray, np.ndarray]:
    us, vs = [], []
    for a, b, src, dst, _ in links:
        if graph.nodes[a]["dims"] is None or graph.nodes[b]["dims"] is None:
            continue
        n = int(np.prod(graph.nodes[a]["dims"]))
        us.append(offs[a] + (np.arange(n) if src is None else src))
        vs.append(offs[b] + (np.arange(n) if dst is None else dst))
    if not us:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(us).astype(np.int64), np.concatenate(vs).astype(np.int64)


def atoms(graph: nx.Graph, links) -> tuple[dict, np.ndarray]:
    """Cell offsets per slot and the atom label (smallest member) of every cell."""
    offs, total = offsets(graph)
    extra: list = []
    for _ in range(8):
        labels = union_find(total, *edge_arrays(graph, [*links, *extra], offs))
        forced = closure_links(graph, offs, labels)
        if not forced:
            break
        extra.extend(forced)
    return offs, labels


def closure_links(graph: nx.Graph, offs, labels) -> list:
    """Self-links making every compound slot's atoms whole rows along one axis."""
    forced = []
    for s in graph.nodes:
        dims = graph.nodes[s]["dims"]
        if dims is None or len([d for d in dims if d > 1]) < 2:
            continue
        cells = labels[offs[s]: offs[s] + int(np.prod(dims))]
        if any(closed(cells, dims, p) for p in range(len(dims))):
            continue
        p = next(i for i, d in enumerate(dims) if d > 1)
        coords = np.unravel_index(np.arange(len(cells)), dims)
        first = np.ravel_multi_index([coords[i] if i == p else np.zeros_like(coords[i])
                                      for i in range(len(dims))], dims)
        forced.append((s, s, np.arange(len(cells)), first, None))
    return forced


def closed(cells: np.ndarray, dims, p: int) -> bool:
    """Whether every atom in this slot is a union of whole hyperplanes along axis ``p``."""
    grid = cells.reshape(dims)
    moved = np.moveaxis(grid, p, 0).reshape(dims[p], -1)
    return bool(np.all(moved == moved[:, :1]))


def union_find(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Component label (smallest member) of each of ``n`` items joined by the pairs ``u``-``v``."""
    parent = np.arange(n, dtype=np.int64)
    if len(u) == 0:
        return parent
    while True:
        pu, pv = parent[u], parent[v]
        if np.array_equal(pu, pv):
            return parent
        m = np.minimum(pu, pv)
        np.minimum.at(parent, pu, m)
        np.minimum.at(parent, pv, m)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
