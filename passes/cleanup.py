"""Cleanup passes: dead code and unused initializers and functions.

Rules of ``dead_code``:
1. A node none of whose outputs is used (by a node, a subgraph, or as a graph output) is removed, in
   every graph, subgraph and function; removing it may make its producers dead in turn.
2. An initializer no node reads is removed, unless it is also a graph input (an overridable input
   is part of the interface).
3. A local function no node calls (directly, in a subgraph or from another function) is removed.
Graph inputs, Loop/Scan body inputs and function signatures are never changed.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from onnxshrink.graph_utils import drop_node
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass, iter_graphs

logger = logging.getLogger(__name__)


def _is_dead(node: ir.Node) -> bool:
    return all(not out.uses() and not out.is_graph_output() for out in node.outputs)


def _remove_dead_nodes(graph, stats: PassStats) -> None:
    for node in reversed(list(graph)):
        if _is_dead(node):
            drop_node(node)
            stats.add("nodes_removed")


def _remove_unused_initializers(graph: ir.Graph, stats: PassStats) -> None:
    for name, value in list(graph.initializers.items()):
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        graph.initializers.pop(name)
        stats.add("initializers_removed")


def _called_functions(model: ir.Model) -> set:
    called = set()
    work = [model.graph]
    seen_fns = set()
    while work:
        g = work.pop()
        for node in g.all_nodes() if isinstance(g, ir.Graph) else _fn_nodes(g):
            key = (node.domain, node.op_type, node.overload)
            if key in model.functions and key not in seen_fns:
                seen_fns.add(key)
                work.append(model.functions[key])
        called |= seen_fns
    return called


def _fn_nodes(fn: ir.Function):
    return fn.all_nodes()


@dataclasses.dataclass(frozen=True)
class DeadCodeConfig:
    remove_functions: bool = True


class DeadCodePass(ShrinkPass):
    """Remove unused nodes, initializers and functions (see module rules)."""

    name = "dead_code"
    Config = DeadCodeConfig
    changes = Changes.TOPOLOGY

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        # Inner graphs first: a subgraph's dead node may be the only user of an outer value.
        graphs = list(iter_graphs(model))
        for graph in reversed(graphs):
            _remove_dead_nodes(graph, stats)
        for graph in graphs:
            if isinstance(graph, ir.Graph):
                _remove_unused_initializers(graph, stats)
        if self.config.remove_functions:
            called = _called_functions(model)
            for key in list(model.functions):
                if key not in called:
                    del model.functions[key]
                    stats.add("functions_removed")
