"""LSTM with int8 weights for ``dynamic_quantize``: ``LSTM`` -> ``com.microsoft.DynamicQuantizeLSTM``.

ONNX has no integer LSTM; ONNX Runtime's CPU EP has a contrib one, ``DynamicQuantizeLSTM``, which
quantizes the input and hidden state at run time (uint8) and multiplies them with int8 weights. The
rewrite: ``W`` [D, 4H, I] and ``R`` [D, 4H, H] quantized symmetrically (int8, zero points 0) per
output row (scales [D, 4H]) or per direction ([D]), stored transposed ([D, I, 4H], [D, H, 4H]) as the
kernel reads them; ``B``, ``sequence_lens``, the initial states and ``P`` pass through; every attribute
but ``layout`` (0) is kept. The new node takes the LSTM's name and outputs. The model then runs on
ONNX Runtime only (a contrib op).

The kernel multiplies through the same u8 x s8 GEMM as ``MatMulInteger``, which CPUs without VNNI
saturate with 8-bit weights. ``narrow`` (set from the pass's ``reduce_range``): ``pair_safe`` scales
(``_qdq_math``: no two neighbouring weights along the input axis sum past 128, so the GEMM cannot
clip), as fast as 7-bit weights (``7bit``) and more exact (``benchmarks/results/dynamic_weights_avx2.md``;
``tests/test_dynamic_lstm.py``); None: 8 bits.

Refused: non-constant, non-3-D, non-float32 or non-finite ``W``/``R``; ``layout`` = 1; a non-float32
input.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxshrink.passes._qdq_math import symmetric_scale

from onnxshrink.graph_utils import NameGen, add_initializer, const_array

DOMAIN = "com.microsoft"


def refusal(node: ir.Node) -> str | None:
    """Why ``node`` (an LSTM) cannot become ``DynamicQuantizeLSTM``, or None."""
    if len(node.inputs) < 3 or node.inputs[1] is None or node.inputs[2] is None:
        return "an LSTM without W or R"
    for v, what in ((node.inputs[1], "W"), (node.inputs[2], "R")):
        w = const_array(v)
        if w is None or w.dtype != np.float32 or w.ndim != 3:
            return f"{what} is not a constant 3-D float32 tensor"
        if not np.all(np.isfinite(w)):
            return f"{what} holds NaN or Inf"
    layout = node.attributes.get("layout")
    if layout is not None and layout.as_int() != 0:
        return "layout=1 (batch first): DynamicQuantizeLSTM reads sequence-first inputs"
    x = node.inputs[0]
    if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        return f"input {x.name!r} is {x.dtype}, not float32"
    return None


def _quantized(w: np.ndarray, per_channel: bool, narrow: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight transposed to [D, K, 4H], scales [D, 4H] or [D]) of a [D, 4H, K] weight, narrowed
    along K as ``narrow`` says (``_qdq_math.symmetric_scale``)."""
    scale = symmetric_scale(w, 2, 2 if per_channel else (1, 2), narrow)
    s = scale[:, :, None] if per_channel else scale[:, None, None]
    wq = np.clip(np.rint(w / s), -127, 127).astype(np.int8)
    return np.ascontiguousarray(np.transpose(wq, (0, 2, 1))), scale


def rewrite(node: ir.Node, graph: ir.Graph, model: ir.Model, names: NameGen, per_channel: bool,
            narrow: str | None) -> ir.Node:
    """Replace ``node`` with a ``DynamicQuantizeLSTM`` (see the module doc); returns the new node."""
    base = node.name or node.outputs[0].name or "lstm"
    ins = [*node.inputs, *[None] * (8 - len(node.inputs))]
    quant = []
    for v, tag in ((ins[1], "w"), (ins[2], "r")):
        wq, scale = _quantized(const_array(v).astype(np.float32), per_channel, narrow)
        quant.append([add_initializer(graph, wq, names(f"{base}_{tag}q")),
                      add_initializer(graph, scale, names(f"{base}_{tag}_scale")),
                      add_initializer(graph, np.zeros(scale.shape, np.int8), names(f"{base}_{tag}_zero_point"))])
    inputs = [ins[0], quant[0][0], quant[1][0], *ins[3:8], quant[0][1], quant[0][2], quant[1][1], quant[1][2]]
    attrs = [a for a in node.attributes.values() if a.name != "layout"]
    new = ir.Node(DOMAIN, "DynamicQuantizeLSTM", inputs, attributes=attrs, num_outputs=len(node.outputs),
                  name=names(f"{base}_int8"))
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
    new.name = node.name or new.name
    if DOMAIN not in model.opset_imports:
        model.opset_imports[DOMAIN] = 1
    return new
