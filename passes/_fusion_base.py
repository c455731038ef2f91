"""Shared machinery of the fusion passes: a rewriter with fresh names, pattern helpers, the node sweep."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import (
    NameGen,
    add_initializer,
    bypass,
    const_array,
    drop_node,
    is_default_domain,
    own_type,
)
from onnxshrink.model_io import default_opset
from onnxshrink.pass_infra import PassStats, iter_graphs

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


class Rewriter:
    """State shared by a fusion's rules: stats, fresh names, and the container being rewritten."""

    def __init__(self, model: ir.Model, stats: PassStats) -> None:
        self.stats = stats
        self.names = NameGen(model)
        for fn in model.functions.values():
            self.names.taken.update(v.name for n in fn.all_nodes() for v in n.outputs if v.name)
        self.container = None

    def const(self, array: np.ndarray, dtype: np.dtype, hint: str) -> ir.Value:
        """A new constant holding ``array`` (computed in float64) cast back to ``dtype``."""
        return add_initializer(self.container, np.asarray(array).astype(dtype), self.names(hint))

    def new_node(self, op_type: str, inputs: list, replaces: ir.Node) -> ir.Node:
        """A node inserted before ``replaces``, with fresh names and ``replaces``' output type and shape.

        Names come from the model-wide ``NameGen``: onnx_ir would name values per graph, which can
        repeat a name of an outer scope inside a subgraph.
        """
        old = replaces.outputs[0]
        out = ir.Value(name=self.names(f"{old.name or op_type}_fused"), type=own_type(old), shape=old.shape)
        node = ir.Node("", op_type, inputs, outputs=[out], name=self.names(f"{op_type}_fused"))
        replaces.graph.insert_before(replaces, node)
        return node

    def replace(self, node: ir.Node, new: ir.Value, key: str, dead: ir.Node | None = None) -> bool:
        """Route ``node``'s users to ``new``, drop ``node`` (and ``dead`` once unused), count ``key``.

        ``new`` takes over the replaced output's name, whether ``new_node`` made it or a producer was
        changed in place (a Conv that absorbed the BatchNorm after it): a name then keeps meaning the
        same values in the original and the rewritten model (``explain`` maps tensors by name), and
        the value ``new`` held before (the Conv's output before the BatchNorm) no longer exists.
        """
        old, fresh = node.outputs[0], new.producer() is not None and not new.uses()
        reason = bypass(node, old, new)
        if reason:
            self.stats.skip(node, reason)
            if fresh:
                new.producer().graph.remove(new.producer(), safe=True)
            return False
        if old.name and new.name != old.name:
            name, old.name = old.name, None
            new.name = name
        if dead is not None and dead.graph is not None and not used(dead):
            drop_node(dead)
        self.stats.add(key)
        return True


def used(node: ir.Node) -> bool:
    return any(v.uses() or v.is_graph_output() for v in node.outputs)


def drop_unused(nodes) -> None:
    """Drop each of ``nodes`` (users before producers) that nothing reads any more."""
    for node in nodes:
        if node.graph is not None and not used(node):
            drop_node(node)


def container_opset(model: ir.Model, container) -> int:
    """The default-domain opset a rule sees in ``container``: a function's own import, else the model's."""
    opset = default_opset(model) or 1
    return container.opset_imports.get("", opset) if isinstance(container, ir.Function) else opset


def note_left(stats: PassStats, key: str) -> None:
    """Count, in ``stats.notes[key]``, a pattern a rule found but left (``gelu_needs_opset_20``)."""
    stats.notes[key] = stats.notes.get(key, 0) + 1


def sole_user(value: ir.Value | None, node: ir.Node) -> bool:
    return value is not None and not value.is_graph_output() and [u.node for u in value.uses()] == [node]


def producer_of(value: ir.Value | None, op_types, user: ir.Node) -> ir.Node | None:
    """The producer of ``value`` if it is one of ``op_types`` in ``user``'s graph (not an outer scope)."""
    node = None if value is None else value.producer()
    if node is None or node.op_type not in op_types or not is_default_domain(node):
        return None
    return node if node.graph is user.graph else None


def dtype_of(value: ir.Value | None) -> ir.DataType | None:
    if value is None or value.dtype is not None:
        return None if value is None else value.dtype
    arr = const_array(value)
    try:
        return None if arr is None else ir.DataType.from_numpy(arr.dtype)
    except Exception:  # noqa: BLE001 - dtypes onnx has no name for
        return None


def input_at(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def set_input(node: ir.Node, i: int, value: ir.Value) -> None:
    if len(node.inputs) <= i:
        node.resize_inputs(i + 1)
    node.replace_input_with(i, value)


def f64(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr, dtype=np.float64)


def candidates(model: ir.Model, op_type: str, producers) -> list[ir.Value]:
    """The values whose dtype and shape decide whether ``producers -> op_type`` pairs fuse."""
    values: list[ir.Value] = []
    for graph in model.graphs():
        for node in graph:
            if node.op_type != op_type:
                continue
            for v in node.inputs:
                first = None if v is None else v.producer()
                if first is not None and first.op_type in producers:
                    values.extend([*first.inputs, *node.inputs])
    return values


def run(model: ir.Model, stats: PassStats, op_types, try_node) -> None:
    rw = Rewriter(model, stats)
    for container in iter_graphs(model):
        rw.container = container
        for node in list(container):
            if node.graph is not None and node.op_type in op_types and is_default_domain(node):
                try_node(rw, node)
