"""Slice chains (a rule of ``eliminate_identities``).

``Slice(Slice(x, s1, e1, a1, p1), s2, e2, a2, p2)`` with constant parameters on disjoint axes is
``Slice(x, s1+s2, e1+e2, a1+a2, p1+p2)``: slicing different axes commutes, and each axis is sliced
once with its own start, end and step. Exporters write one Slice per axis (YOLOX's Focus takes
``x[..., ::2, ::2]`` as two Slices, shared by two consumers). The rule fires only when every reader
of the inner Slice is such a Slice, so the inner one goes away; each reader gets the merged
parameters. Refused: the attribute form (opset < 10), parameters that are not constants, overlapping
axes, negative axes of a tensor whose rank is unknown, an inner output that is a graph output or is
read inside a subgraph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxshrink.passes import _value_facts as vf

from onnxshrink.graph_utils import add_initializer, drop_node, is_default_domain

Params = tuple[list[int], list[int], list[int], list[int]]


def params(node: ir.Node, rank: int | None) -> Params | None:
    """Constant (starts, ends, axes in [0, rank), steps) of a Slice (either form), or None."""
    if node.op_type != "Slice" or not is_default_domain(node):
        return None
    if "starts" in node.attributes:  # opset < 10: attributes, no steps
        starts, ends, axes = (vf.attr_ints(node, k) for k in ("starts", "ends", "axes"))
        steps = None
    else:
        ins = [*node.inputs[1:5], None, None][:4]
        got = [vf.ints(v) if v is not None else None for v in ins]
        if any(v is not None and g is None for v, g in zip(ins, got)):
            return None  # a parameter that is not a constant
        starts, ends, axes, steps = got
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    if min(axes, default=0) < 0:
        if rank is None:
            return None
        axes = [a % rank for a in axes]
    if len(axes) != len(starts) or len(steps) != len(starts) or len(set(axes)) != len(axes):
        return None
    return starts, ends, axes, steps


def merge_chain(node: ir.Node, container, names) -> bool:
    """Merge the inner Slice feeding ``node`` into every Slice reading it (see the module doc)."""
    inner = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if inner is None or inner.op_type != "Slice" or inner.graph is None:
        return False
    mid = inner.outputs[0]
    if mid.is_graph_output():
        return False
    x = inner.inputs[0]
    dims = vf.dims(x)
    rank = len(dims) if dims is not None else None
    first = params(inner, rank) if "starts" not in inner.attributes else None
    if first is None:
        return False
    readers = []
    for user, index in mid.uses():
        p = params(user, rank) if "starts" not in user.attributes else None
        if index != 0 or user.graph is not inner.graph or p is None or set(p[2]) & set(first[2]):
            return False
        readers.append((user, p))
    for user, p in readers:
        merged = [np.array(a + b, dtype=np.int64) for a, b in zip(first, p)]
        new = [add_initializer(container, arr, names(f"slice_{what}"))
               for arr, what in zip(merged, ("starts", "ends", "axes", "steps"))]
        user.replace_input_with(0, x)
        for i, value in enumerate(new, start=1):
            if i < len(user.inputs):
                user.replace_input_with(i, value)
            else:
                user.resize_inputs(i + 1)
                user.replace_input_with(i, value)
    drop_node(inner)
    return True
