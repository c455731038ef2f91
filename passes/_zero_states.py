"""Zero initial states of recurrent ops: ``LSTM``/``GRU``/``RNN`` with ``initial_h``/``initial_c`` all zeros.

The ONNX spec gives an omitted ``initial_h`` or ``initial_c`` the value 0, so an input proven to be all
zeros can be dropped. Exporters build these zeros at run time from the batch size (tf2onnx:
``Shape -> Cast -> Slice -> Concat -> Cast -> Expand(0) -> Unsqueeze -> Concat``; PyTorch:
``ConstantOfShape``), eight nodes per LSTM that the rule leaves to ``dead_code``.

``proven_zero`` proves a value all zeros from a constant, ``ConstantOfShape`` (value 0 or absent), or
an op that only moves, copies or converts elements of zero inputs (``Expand``, ``Reshape``,
``Unsqueeze``, ``Concat``, ``Cast``, ...). Arithmetic is never followed: ``0 * x`` is NaN for an
infinite x. The walk stops after ``_MAX_DEPTH`` producers; unknown means not proven.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import const_array, is_default_domain

_MAX_DEPTH = 16
#: op -> indices of its inputs that must all be zero for its output to be (input 0 unless listed).
_MOVERS = {
    "Identity": (0,), "Cast": (0,), "CastLike": (0,), "Expand": (0,), "Reshape": (0,), "Flatten": (0,),
    "Squeeze": (0,), "Unsqueeze": (0,), "Transpose": (0,), "Slice": (0,), "Gather": (0,), "Tile": (0,),
    "Neg": (0,), "Abs": (0,), "Relu": (0,),
}
#: recurrent op -> the input indices of its initial states
STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}


def proven_zero(value: ir.Value | None, depth: int = 0) -> bool:
    """True when every element of ``value`` is provably 0 (or -0.0) in every run."""
    if value is None or depth > _MAX_DEPTH or value.is_graph_input():
        return False
    arr = const_array(value)
    if arr is not None:
        return arr.dtype != object and arr.size > 0 and not np.any(arr)
    node = value.producer()
    if node is None or not is_default_domain(node) or len(node.outputs) != 1:
        return False
    if node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        return attr is None or not np.any(attr.as_tensor().numpy())
    if node.op_type == "Concat":
        return all(proven_zero(v, depth + 1) for v in node.inputs)
    indices = _MOVERS.get(node.op_type)
    return indices is not None and all(
        i < len(node.inputs) and proven_zero(node.inputs[i], depth + 1) for i in indices)


def zero_states(node: ir.Node) -> list[int]:
    """Indices of ``node``'s initial-state inputs that are present and proven all zeros."""
    return [i for i in STATE_INPUTS.get(node.op_type, ())
            if i < len(node.inputs) and node.inputs[i] is not None and proven_zero(node.inputs[i])]


def drop_zero_states(node: ir.Node) -> int:
    """Drop ``node``'s proven-zero initial states (trailing empty inputs trimmed); returns how many."""
    found = zero_states(node)
    for i in found:
        node.replace_input_with(i, None)
    n = len(node.inputs)
    while n and node.inputs[n - 1] is None:
        n -= 1
    if n < len(node.inputs):
        node.resize_inputs(n)
    return len(found)
