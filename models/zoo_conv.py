"""Convolutional zoo models: input "input" float32 [N,3,32,32], output "logits" float32 [N,10].

Weights are random (seeded) with BatchNormalization after bias-free convs, as exporters write them.
"""

from __future__ import annotations

import onnx

from models.graph_builder import FLOAT, GraphBuilder

IMAGE = [("input", FLOAT, ["N", 3, 32, 32])]
LOGITS = [("logits", FLOAT, ["N", 10])]


def _finish(b: GraphBuilder, last: str) -> onnx.ModelProto:
    b.set_output(last, "logits")
    return b.model(IMAGE, LOGITS)


def plain_cnn() -> onnx.ModelProto:
    """Three Conv-BN-Relu stages with MaxPool, then GlobalAveragePool, Flatten, Gemm."""
    b = GraphBuilder("plain_cnn", seed=1)
    x = b.conv_bn("input", 3, 32)
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.conv_bn(x, 32, 48)
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.conv_bn(x, 48, 64)
    return _finish(b, b.head(x, 64))


def _basic_block(b: GraphBuilder, x: str, cin: int, cout: int, stride: int) -> str:
    y = b.conv_bn(x, cin, cout, 3, stride)
    y = b.conv_bn(y, cout, cout, 3, 1, act=None)
    short = x if (stride == 1 and cin == cout) else b.conv_bn(x, cin, cout, 1, stride, act=None)
    return b.op("Relu", [b.op("Add", [y, short])])


def resnet() -> onnx.ModelProto:
    """ResNet-style: stem, two identity blocks and a strided block with a 1x1 projection."""
    b = GraphBuilder("resnet", seed=2)
    x = b.conv_bn("input", 3, 32)
    x = _basic_block(b, x, 32, 32, 1)
    x = _basic_block(b, x, 32, 64, 2)
    x = _basic_block(b, x, 64, 64, 1)
    return _finish(b, b.head(x, 64))


def _inverted_residual(b: GraphBuilder, x: str, cin: int, cout: int, stride: int, expand: int) -> str:
    hidden = cin * expand
    y = b.conv_bn(x, cin, hidden, 1, act="Relu6")
    y = b.conv_bn(y, hidden, hidden, 3, stride, group=hidden, act="Relu6")
    y = b.conv_bn(y, hidden, cout, 1, act=None)
    if stride == 1 and cin == cout:
        y = b.op("Add", [x, y])
    return y


def mobilenetv2() -> onnx.ModelProto:
    """MobileNetV2-style: depthwise inverted residual blocks with Clip(0, 6) as Relu6."""
    b = GraphBuilder("mobilenetv2", seed=3)
    x = b.conv_bn("input", 3, 16, 3, 2, act="Relu6")
    x = _inverted_residual(b, x, 16, 16, 1, 4)
    x = _inverted_residual(b, x, 16, 24, 2, 4)
    x = _inverted_residual(b, x, 24, 24, 1, 4)
    x = b.conv_bn(x, 24, 64, 1, act="Relu6")
    return _finish(b, b.head(x, 64))


def _inception_module(b: GraphBuilder, x: str, cin: int) -> tuple[str, int]:
    b1 = b.conv_bn(x, cin, 16, 1)
    b2 = b.conv_bn(b.conv_bn(x, cin, 12, 1), 12, 24, 3)
    b3 = b.conv_bn(b.conv_bn(b.conv_bn(x, cin, 8, 1), 8, 12, 3), 12, 12, 3)
    pool = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    b4 = b.conv_bn(pool, cin, 12, 1)
    return b.op("Concat", [b1, b2, b3, b4], axis=1), 16 + 24 + 12 + 12


def inception() -> onnx.ModelProto:
    """Inception-style: two modules whose four branches are concatenated on channels."""
    b = GraphBuilder("inception", seed=4)
    x = b.conv_bn("input", 3, 32, 3, 2)
    x, c = _inception_module(b, x, 32)
    x, c = _inception_module(b, x, c)
    return _finish(b, b.head(x, c))


def densenet() -> onnx.ModelProto:
    """DenseNet-style: BN-Relu-Conv layers whose outputs are concatenated to all previous features."""
    b = GraphBuilder("densenet", seed=5)
    x = b.conv("input", 3, 24, 3, 2, bias=False)
    c, growth = 24, 12
    for block in range(2):
        for _ in range(3):
            y = b.op("Relu", [b.bn(x, c)])
            y = b.conv(b.op("Relu", [b.bn(b.conv(y, c, 4 * growth, 1, bias=False), 4 * growth)]),
                       4 * growth, growth, 3, bias=False)
            x = b.op("Concat", [x, y], axis=1)
            c += growth
        if block == 0:
            x = b.conv(b.op("Relu", [b.bn(x, c)]), c, c // 2, 1, bias=False)
            x = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            c //= 2
    x = b.op("Relu", [b.bn(x, c)])
    return _finish(b, b.head(x, c))


def _channel_shuffle(b: GraphBuilder, x: str, c: int, groups: int, hw: int) -> str:
    x = b.op("Reshape", [x, b.ints([-1, groups, c // groups, hw, hw])])
    x = b.op("Transpose", [x], perm=[0, 2, 1, 3, 4])
    return b.op("Reshape", [x, b.ints([-1, c, hw, hw])])


def grouped_conv() -> onnx.ModelProto:
    """ResNeXt/ShuffleNet-style: grouped 3x3 convs (group 4) with a channel shuffle and residuals."""
    b = GraphBuilder("grouped_conv", seed=6)
    x = b.conv_bn("input", 3, 32, 3, 2)
    for _ in range(2):
        y = b.conv_bn(x, 32, 64, 1)
        y = b.conv_bn(y, 64, 64, 3, group=4)
        y = _channel_shuffle(b, y, 64, 4, 16)
        y = b.conv_bn(y, 64, 32, 1, group=2, act=None)
        x = b.op("Relu", [b.op("Add", [x, y])])
    return _finish(b, b.head(x, 32))


def split_branches() -> onnx.ModelProto:
    """Channel Split into unequal branches (GLU gate, Slice, plain path) re-joined by Concat and Mul."""
    b = GraphBuilder("split_branches", seed=7)
    x = b.conv_bn("input", 3, 48, 3, 2)
    s0, s1, s2 = b.op("Split", [x, b.ints([16, 16, 16], "split")], n_out=3, axis=1)
    gate = b.op("Sigmoid", [s1])
    glu = b.op("Mul", [s0, gate])
    path = b.conv_bn(s2, 16, 16, 3)
    y = b.conv_bn(b.op("Concat", [glu, path], axis=1), 32, 64, 3, 2)
    lo = b.op("Slice", [y, b.ints([0]), b.ints([32]), b.ints([1])])
    hi = b.op("Slice", [y, b.ints([32]), b.ints([64]), b.ints([1])])
    z = b.op("Add", [b.conv_bn(lo, 32, 32, 3, act=None), hi])
    z = b.conv_bn(b.op("Relu", [z]), 32, 48, 1)
    return _finish(b, b.head(z, 48))


def deep_resnet(blocks: int, width: int = 16, size: int = 8) -> onnx.ModelProto:
    """``blocks`` identity residual blocks of ``width`` channels on ``size`` x ``size`` maps (not in the
    zoo: a depth knob for scaling checks, ``tests/test_segments.py`` and ``bench_reconstruct.py``)."""
    b = GraphBuilder(f"deep_resnet_{blocks}", seed=7)
    x = b.conv_bn("input", 3, width)
    for _ in range(blocks):
        x = _basic_block(b, x, width, width, 1)
    b.set_output(b.head(x, width), "logits")
    return b.model([("input", FLOAT, ["N", 3, size, size])], LOGITS)
