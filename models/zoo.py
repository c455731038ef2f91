"""The test model zoo: small, seeded, float32 models built in code, one per architecture family.

``ZOO`` maps a name to a builder returning a fresh ``onnx.ModelProto`` (opset 17, batch dim "N").
Each model's builder docstring states its inputs and outputs; ``save(name, folder)`` writes one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx

from models import zoo_conv, zoo_other

ZOO: dict[str, Callable[[], onnx.ModelProto]] = {
    "plain_cnn": zoo_conv.plain_cnn,
    "resnet": zoo_conv.resnet,
    "mobilenetv2": zoo_conv.mobilenetv2,
    "inception": zoo_conv.inception,
    "densenet": zoo_conv.densenet,
    "grouped_conv": zoo_conv.grouped_conv,
    "split_branches": zoo_conv.split_branches,
    "mlp": zoo_other.mlp,
    "transformer": zoo_other.transformer,
    "dynamic_batch": zoo_other.dynamic_batch,
    "control_flow": zoo_other.control_flow,
    "lossless_patterns": zoo_other.lossless_patterns,
}


def build(name: str) -> onnx.ModelProto:
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]()


def save(name: str, folder: str | Path) -> Path:
    """Write zoo model ``name`` to ``folder/name.onnx`` and return the path."""
    path = Path(folder) / f"{name}.onnx"
    onnx.save(build(name), path)
    return path


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model`` as half-precision exporters write them: every float32 initializer,
    Constant, graph input/output and value type becomes float16 (inputs and outputs included), and Casts to
    float32 cast to float16, in If/Loop bodies too (Constant value_float becomes a float16 value)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)

    def half(t: TensorProto) -> None:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))

    def convert(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            half(t)
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT16
        for node in g.node:
            if node.op_type == "Constant" and node.attribute[0].name == "value_float":
                node.attribute[0].CopyFrom(onnx.helper.make_attribute(
                    "value", numpy_helper.from_array(np.array(node.attribute[0].f, np.float16))))
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    half(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    convert(a.g)
                elif node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16

    convert(out.graph)
    return out


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for n in ZOO:
        print(save(n, out))
