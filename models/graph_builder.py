"""A small, seeded ONNX graph builder for the test models (onnx.helper underneath).

Names are generated (``conv_3``, ``conv_3_w``); weights are drawn from a seeded generator with
fan-in scaling so deep random nets keep activations of order one.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


class GraphBuilder:
    """Collects nodes and initializers; ``op`` returns the output name(s) of the node it adds."""

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count: dict[str, int] = {}

    # ---------------------------------------------------------------- names and constants

    def fresh(self, base: str) -> str:
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return f"{base}_{n}"

    def const(self, array, base: str = "const") -> str:
        """Add ``array`` as an initializer and return its name."""
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values, base: str = "shape") -> str:
        return self.const(np.array(values, dtype=np.int64), base)

    def scalar(self, value: float, base: str = "scalar") -> str:
        return self.const(np.array(value, dtype=np.float32), base)

    def weight(self, shape, fan_in: int | None = None, base: str = "w", gain: float = 2.0) -> str:
        """Random float32 weight of ``shape`` scaled by ``sqrt(gain / fan_in)``."""
        fan_in = fan_in or int(np.prod(shape[1:])) or 1
        w = self.rng.standard_normal(shape) * math.sqrt(gain / fan_in)
        return self.const(w.astype(np.float32), base)

    def small(self, shape, scale: float = 0.1, base: str = "b") -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), base)

    # ---------------------------------------------------------------- nodes

    def op(self, op_type: str, inputs, n_out: int = 1, name: str | None = None, **attrs):
        """Add a node; returns its output name, or a tuple of names when ``n_out > 1``."""
        node_name = name or self.fresh(op_type.lower())
        outs = [f"{node_name}_out"] if n_out == 1 else [f"{node_name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, **attrs))
        return outs[0] if n_out == 1 else tuple(outs)

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True) -> str:
        w = self.weight((cout, cin // group, k, k), base="conv_w")
        ins = [x, w] + ([self.small((cout,), base="conv_b")] if bias else [])
        p = k // 2
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[p, p, p, p], group=group)

    def bn(self, x: str, c: int) -> str:
        rng = self.rng
        g = self.const((1 + 0.1 * rng.standard_normal(c)).astype(np.float32), "bn_scale")
        b = self.const((0.1 * rng.standard_normal(c)).astype(np.float32), "bn_bias")
        m = self.const((0.1 * rng.standard_normal(c)).astype(np.float32), "bn_mean")
        v = self.const((1 + 0.2 * rng.random(c)).astype(np.float32), "bn_var")
        return self.op("BatchNormalization", [x, g, b, m, v], epsilon=1e-5)

    def conv_bn(self, x, cin, cout, k=3, stride=1, group=1, act: str | None = "Relu") -> str:
        y = self.bn(self.conv(x, cin, cout, k, stride, group, bias=False), cout)
        if act == "Relu":
            y = self.op("Relu", [y])
        elif act == "Relu6":
            y = self.op("Clip", [y, self.scalar(0.0, "clip_min"), self.scalar(6.0, "clip_max")])
        return y

    def linear(self, x: str, din: int, dout: int, style: str = "matmul") -> str:
        """A dense layer as ``MatMul + Add`` (exporter style) or as ``Gemm`` (transB=1)."""
        if style == "gemm":
            w = self.weight((dout, din), fan_in=din, base="fc_w")
            return self.op("Gemm", [x, w, self.small((dout,), base="fc_b")], transB=1)
        w = self.weight((din, dout), fan_in=din, base="fc_w")
        return self.op("Add", [self.op("MatMul", [x, w]), self.small((dout,), base="fc_b")])

    def head(self, x: str, c: int, classes: int = 10) -> str:
        """GlobalAveragePool -> Flatten -> Gemm classifier."""
        g = self.op("GlobalAveragePool", [x])
        return self.linear(self.op("Flatten", [g], axis=1), c, classes, style="gemm")

    # ---------------------------------------------------------------- model

    def model(self, inputs, outputs, opset: int = OPSET) -> onnx.ModelProto:
        """Finish the graph. ``inputs``/``outputs``: lists of (name, elem_type, shape)."""
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
            [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnxshrink-zoo")
        m.ir_version = IR_VERSION
        return m

    def set_output(self, value: str, name: str) -> None:
        """Rename the producer output ``value`` to ``name`` (no Identity left behind)."""
        for node in self.nodes:
            for i, o in enumerate(node.output):
                if o == value:
                    node.output[i] = name
            for i, x in enumerate(node.input):
                if x == value:
                    node.input[i] = name


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL
