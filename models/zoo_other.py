"""Non-convolutional zoo models: MLP, transformer encoder, dynamic-batch shape logic, control flow, and
the lossless-pattern sampler. All float32, opset 17, batch dim "N".
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models.graph_builder import BOOL, FLOAT, INT64, GraphBuilder

SEQ, DIM, HEADS, FFN = 16, 64, 4, 128


def mlp() -> onnx.ModelProto:
    """input [N,64] -> Gemm, MatMul+Add and Relu layers -> logits [N,10]."""
    b = GraphBuilder("mlp", seed=8)
    x = b.op("Relu", [b.linear("input", 64, 128, style="gemm")])
    x = b.op("Relu", [b.linear(x, 128, 128)])
    x = b.op("Relu", [b.linear(x, 128, 64)])
    b.set_output(b.linear(x, 64, 10, style="gemm"), "logits")
    return b.model([("input", FLOAT, ["N", 64])], [("logits", FLOAT, ["N", 10])])


def _heads_shape(b: GraphBuilder, x: str, tail: list[int]) -> str:
    """Exporter-style shape: Shape -> Gather(0), Gather(1) -> Unsqueeze -> Concat with constant ``tail``."""
    parts = []
    for axis in (0, 1):
        shape = b.op("Shape", [x])  # one Shape per use, like the TorchScript exporter
        dim = b.op("Gather", [shape, b.const(np.array(axis, np.int64), "idx")], axis=0)
        parts.append(b.op("Unsqueeze", [dim, b.ints([0], "axes")]))
    return b.op("Concat", [*parts, b.ints(tail)], axis=0)


def _attention(b: GraphBuilder, x: str) -> str:
    dh = DIM // HEADS
    heads = {}
    for role, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        proj = b.linear(x, DIM, DIM)
        split = b.op("Reshape", [proj, _heads_shape(b, x, [HEADS, dh])])
        heads[role] = b.op("Transpose", [split], perm=perm)
    scores = b.op("MatMul", [heads["q"], heads["k"]])
    scores = b.op("Div", [scores, b.scalar(math.sqrt(dh), "sqrt_dh")])
    probs = b.op("Softmax", [scores], axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, heads["v"]])], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, _heads_shape(b, x, [DIM])])
    return b.linear(ctx, DIM, DIM)


def _layer_norm(b: GraphBuilder, x: str) -> str:
    scale = b.const((1 + 0.1 * b.rng.standard_normal(DIM)).astype(np.float32), "ln_scale")
    return b.op("LayerNormalization", [x, scale, b.small((DIM,), base="ln_bias")], axis=-1, epsilon=1e-5)


def _gelu(b: GraphBuilder, x: str) -> str:
    erf = b.op("Erf", [b.op("Div", [x, b.scalar(math.sqrt(2.0), "sqrt2")])])
    return b.op("Mul", [b.op("Mul", [x, b.op("Add", [erf, b.scalar(1.0, "one")])]), b.scalar(0.5, "half")])


def transformer() -> onnx.ModelProto:
    """Two pre-LN encoder blocks, 4-head attention, Erf GELU; input/output [N,16,64] (exporter style)."""
    b = GraphBuilder("transformer", seed=9)
    x = "input"
    for _ in range(2):
        x = b.op("Add", [x, _attention(b, _layer_norm(b, x))])
        ff = b.linear(_gelu(b, b.linear(_layer_norm(b, x), DIM, FFN)), FFN, DIM)
        x = b.op("Add", [x, ff])
    b.set_output(_layer_norm(b, x), "output")
    io = ["N", SEQ, DIM]
    return b.model([("input", FLOAT, io)], [("output", FLOAT, io)])


def dynamic_batch() -> onnx.ModelProto:
    """Shape logic on a symbolic batch: Shape/Slice/Concat flatten, ConstantOfShape and Expand by N."""
    b = GraphBuilder("dynamic_batch", seed=10)
    x = b.conv_bn("input", 3, 16, 3, 2)
    n = b.op("Slice", [b.op("Shape", [x]), b.ints([0]), b.ints([1])])
    flat = b.op("Reshape", [x, b.op("Concat", [n, b.ints([-1])], axis=0)])
    h = b.linear(flat, 16 * 8 * 8, 32, style="gemm")
    n32 = b.op("Concat", [n, b.ints([32])], axis=0)
    fill = b.op("ConstantOfShape", [n32], value=numpy_helper.from_array(np.array([0.5], np.float32)))
    gate = b.op("Expand", [b.small((1, 32), 1.0, "gate"), n32])
    h = b.op("Relu", [b.op("Mul", [b.op("Add", [h, fill]), gate])])
    b.set_output(b.linear(h, 32, 10, style="gemm"), "logits")
    return b.model([("input", FLOAT, ["N", 3, 16, 16])], [("logits", FLOAT, ["N", 10])])


def _then_branch(b: GraphBuilder, h: str) -> onnx.GraphProto:
    w, bias = b.weight((16, 16), base="then_w"), b.small((16,), base="then_b")
    half = helper.make_node("Constant", [], ["then_half"], value_float=0.5)
    one = helper.make_node("Add", ["then_half", "then_half"], ["then_one"])
    mm = helper.make_node("MatMul", [h, w], ["then_mm"])
    add = helper.make_node("Add", ["then_mm", bias], ["then_add"])
    scaled = helper.make_node("Mul", ["then_add", "then_one"], ["then_scaled"])
    ids = [helper.make_node("Identity", ["then_scaled"], ["then_id0"]),
           helper.make_node("Identity", ["then_id0"], ["then_out"])]
    return helper.make_graph([half, one, mm, add, scaled, *ids], "then_branch", [],
                             [helper.make_tensor_value_info("then_out", FLOAT, ["N", 16])])


def _else_branch(b: GraphBuilder, h: str) -> onnx.GraphProto:
    w = b.weight((16, 16), base="else_w")
    mm = helper.make_node("MatMul", [h, w], ["else_mm"])
    sub = helper.make_node("Sub", [h, "else_mm"], ["else_out"])
    return helper.make_graph([mm, sub], "else_branch", [],
                             [helper.make_tensor_value_info("else_out", FLOAT, ["N", 16])])


def _loop_body(b: GraphBuilder) -> onnx.GraphProto:
    w, bias = b.weight((16, 16), gain=1.0, base="loop_w"), b.small((16,), base="loop_b")
    nodes = [
        helper.make_node("MatMul", ["acc_in", w], ["body_mm"]),
        helper.make_node("Add", ["body_mm", bias], ["body_add"]),
        helper.make_node("Tanh", ["body_add"], ["acc_out"]),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    inputs = [helper.make_tensor_value_info("iter", INT64, []),
              helper.make_tensor_value_info("cond_in", BOOL, []),
              helper.make_tensor_value_info("acc_in", FLOAT, ["N", 16])]
    outputs = [helper.make_tensor_value_info("cond_out", BOOL, []),
               helper.make_tensor_value_info("acc_out", FLOAT, ["N", 16])]
    return helper.make_graph(nodes, "loop_body", inputs, outputs)


def control_flow() -> onnx.ModelProto:
    """An If on the sign of a sum (branches read outer initializers, hold Identity chains and a foldable
    constant) feeding a 3-step Loop (Tanh(acc @ W + b)); input [N,8] -> logits [N,10]."""
    b = GraphBuilder("control_flow", seed=11)
    pre = b.linear("input", 8, 16)
    h = b.op("Relu", [pre])
    cond = b.op("Greater", [b.op("ReduceSum", [pre], keepdims=0), b.scalar(0.0, "threshold")])
    branched = b.op("If", [cond], then_branch=_then_branch(b, h), else_branch=_else_branch(b, h))
    trip = b.const(np.array(3, np.int64), "trip")
    keep = b.const(np.array(True), "keep_going")
    looped = b.op("Loop", [trip, keep, branched], body=_loop_body(b))
    b.set_output(b.linear(looped, 16, 10, style="gemm"), "logits")
    return b.model([("input", FLOAT, ["N", 8])], [("logits", FLOAT, ["N", 10])])


def _foldable_flatten_shape(b: GraphBuilder, x: str) -> str:
    """[-1, C*H*W] computed from constants and from the static dims of ``x`` (Shape -> Slice ->
    ReduceProd), the way exporters spell flatten."""
    static = b.op("Slice", [b.op("Shape", [x]), b.ints([1]), b.ints([4])])
    prod = b.op("ReduceProd", [static], keepdims=1)
    minus_one = b.op("Neg", [b.op("Cast", [b.ints([1])], to=INT64)])
    return b.op("Concat", [minus_one, prod], axis=0)


def lossless_patterns() -> onnx.ModelProto:
    """What exporters leave behind and lossless passes should remove: an Identity chain, Conv+BN (with and
    without bias), Dropout, Cast to the same type, Mul by one, a cancelling Transpose pair, foldable shape
    arithmetic, a Reshape chain, duplicate initializers, a duplicated Relu (CSE) and MatMul+Add (Gemm).
    input [N,3,16,16] -> logits [N,10]."""
    b = GraphBuilder("lossless_patterns", seed=12)
    x = b.op("Identity", [b.op("Identity", ["input"])])
    x = b.op("Relu", [b.bn(b.conv(x, 3, 16, 3), 16)])
    x = b.op("Dropout", [x])
    x = b.op("Cast", [x], to=FLOAT)
    x = b.bn(b.conv(x, 16, 32, 3, 2, bias=False), 32)
    r1, r2 = b.op("Relu", [x]), b.op("Relu", [x])
    x = b.op("Add", [r1, r2])
    x = b.op("Mul", [x, b.scalar(1.0, "one")])
    x = b.op("Transpose", [b.op("Transpose", [x], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2])
    flat = b.op("Reshape", [x, _foldable_flatten_shape(b, x)])
    flat = b.op("Reshape", [b.op("Reshape", [flat, b.ints([-1, 32, 64])]), b.ints([-1, 32 * 64])])
    bias = (0.1 * b.rng.standard_normal(64)).astype(np.float32)
    h = b.op("MatMul", [flat, b.weight((2048, 64), fan_in=2048, base="fc_w")])
    h = b.op("Relu", [b.op("Add", [h, b.const(bias, "fc_b")])])
    h = b.op("Add", [b.op("MatMul", [h, b.weight((64, 64), fan_in=64, base="fc_w")]),
                     b.const(bias.copy(), "fc_b_dup")])
    h = b.op("Identity", [b.op("Relu", [h])])
    b.set_output(b.linear(h, 64, 10), "logits")
    return b.model([("input", FLOAT, ["N", 3, 16, 16])], [("logits", FLOAT, ["N", 10])])
