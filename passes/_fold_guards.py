"""Guard rails of ``fold_constants``: which nodes may be folded, how big their outputs would be, and
when an ``If`` branch may be inlined. Every refusal is a sentence the pass reports with ``stats.skip``.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import const_array, is_default_domain

#: Ops whose result changes from run to run: never folded, never merged.
NON_DETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def is_non_deterministic(node: ir.Node) -> bool:
    """A random op of the default domain, or a Dropout whose ``training_mode`` is not constant false."""
    if not is_default_domain(node):
        return False
    if node.op_type in NON_DETERMINISTIC_OPS:
        return True
    if node.op_type == "Dropout" and len(node.inputs) >= 3 and node.inputs[2] is not None:
        mode = const_array(node.inputs[2])
        return mode is None or bool(np.any(mode))
    return False


def refusal(node: ir.Node, keep_ops: tuple[str, ...]) -> str | None:
    """Why a node with only constant inputs must not be folded, or None."""
    if not is_default_domain(node):
        return f"op of domain {node.domain!r}: only default-domain ops are folded"
    if is_non_deterministic(node):
        return "non-deterministic op (a random generator or Dropout in training mode)"
    if node.op_type in keep_ops:
        return f"{node.op_type} is kept (keep_ops): folding it would undo quantization"
    if any(attr.is_ref() for attr in node.attributes.values()):
        return "an attribute refers to a function attribute"
    return None


def _itemsize(value: ir.Value, fallback: np.ndarray | None = None) -> float:
    if value.dtype is not None:
        try:
            return value.dtype.itemsize
        except (AttributeError, TypeError):
            pass
    return fallback.itemsize if fallback is not None else 4


def predicted_bytes(node: ir.Node, arrays: list) -> int | None:
    """Bytes the outputs would hold, known before evaluating (ops that grow data, static shapes)."""
    try:
        size = _predicted_elements(node, arrays)
    except (ValueError, TypeError, IndexError, OverflowError, KeyError):
        size = None
    if size is not None:
        return math.ceil(size * _itemsize(node.outputs[0], arrays[0] if arrays else None))
    total = 0
    for out in node.outputs:
        if out.shape is None or not out.shape.is_static():
            return None
        total += math.prod(out.shape) * _itemsize(out)
    return math.ceil(total)


def _predicted_elements(node: ir.Node, arrays: list) -> int | None:
    op = node.op_type
    if op == "ConstantOfShape":
        return int(np.prod(arrays[0])) if arrays[0] is not None else None
    if op == "Expand" and arrays[0] is not None and arrays[1] is not None:
        return math.prod(np.broadcast_shapes(arrays[0].shape, tuple(int(d) for d in arrays[1])))
    if op == "Tile" and arrays[0] is not None and arrays[1] is not None:
        return math.prod(int(d) * int(r) for d, r in zip(arrays[0].shape, arrays[1]))
    if op == "Range" and all(a is not None for a in arrays[:3]):
        start, limit, delta = (float(a) for a in arrays[:3])
        return max(math.ceil((limit - start) / delta), 0) if delta else None
    return None


def inline_if_refusal(node: ir.Node, graph, branch: ir.Graph, model_names: collections.Counter) -> str | None:
    """Why the taken ``branch`` of a constant-condition ``If`` cannot replace ``node``, or None.

    Its names must not be defined anywhere else in the model (moved into the enclosing graph they
    would clash with that scope or shadow names of its other subgraphs); a function body cannot take
    initializers; the outputs must line up.
    """
    if len(branch.outputs) != len(node.outputs):
        return "the taken branch has a different number of outputs than the If"
    if branch.inputs:
        return "the taken branch declares inputs"
    if branch.initializers and not isinstance(graph, ir.Graph):
        return "the taken branch has initializers and the If is in a function body"
    own = collections.Counter()
    for sub in _all_subgraphs(node):
        own.update(defined_names(sub))
    branch_names = set()
    for sub in [branch, *branch.subgraphs()]:
        branch_names.update(defined_names(sub))
    clashes = sorted(n for n in branch_names if model_names[n] > own[n])
    if clashes:
        return f"the taken branch defines names used elsewhere in the model: {clashes[:5]}"
    return None


def _all_subgraphs(node: ir.Node):
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for g in graphs:
            yield g
            yield from g.subgraphs()


def defined_names(graph) -> list[str]:
    names = [v.name for v in graph.inputs if v.name]
    if isinstance(graph, ir.Graph):
        names.extend(graph.initializers)
    names.extend(o.name for n in graph for o in n.outputs if o.name)
    return names
