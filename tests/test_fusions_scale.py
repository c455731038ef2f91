"""``fuse_conv_bias`` folding a per-channel Mul/Div into the Conv's weight and bias."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.test_fusions import F16, F32, RNG, build, ops, run_pass


@pytest.mark.parametrize(
    ("shape", "op", "bias", "first"),
    [((4, 1, 1), "Mul", True, False), ((1,), "Mul", False, True), ((), "Div", True, False),
     ((1, 4, 1, 1), "Div", False, False)],
)
def test_conv_scale_fused(shape, op, bias, first):
    inits = {"w": RNG.standard_normal((4, 2, 3, 3)).astype(F32),
             "k": RNG.uniform(0.5, 2.0, shape).astype(F32)}
    conv_in = ["x", "w"] + (["b"] if bias else [])
    if bias:
        inits["b"] = RNG.standard_normal(4).astype(F32)
    proto = build(
        [helper.make_node("Conv", conv_in, ["c"]),
         helper.make_node(op, ["k", "c"] if first else ["c", "k"], ["m"]),
         helper.make_node("Relu", ["m"], ["y"])],
        [("x", F32, [2, 2, 5, 5])], [("y", F32, [2, 4, 3, 3])], inits,
    )
    model, stats = run_pass(proto, "fuse_conv_bias")
    assert stats.counts["conv_scales_fused"] == 1 and ops(model) == ["Conv", "Relu"]


def test_conv_scale_then_bias_fold_in_one_run():
    # Conv -> Mul -> Add and Conv -> Add -> Mul: both collapse in a single sweep
    inits = {"w": RNG.standard_normal((3, 2, 1, 1)).astype(F32), "s": RNG.uniform(1, 2, (3, 1, 1)).astype(F32),
             "t": RNG.standard_normal((3, 1, 1)).astype(F32), "w2": RNG.standard_normal((3, 3, 1, 1)).astype(F32)}
    proto = build(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "s"], ["m"]),
         helper.make_node("Add", ["m", "t"], ["a"]), helper.make_node("Conv", ["a", "w2"], ["c2"]),
         helper.make_node("Add", ["c2", "t"], ["a2"]), helper.make_node("Mul", ["s", "a2"], ["y"])],
        [("x", F32, [1, 2, 4, 4])], [("y", F32, [1, 3, 4, 4])], inits,
    )
    model, stats = run_pass(proto, "fuse_conv_bias")
    assert stats.counts["conv_scales_fused"] == 2 and stats.counts["conv_biases_fused"] == 2
    assert ops(model) == ["Conv", "Conv"]


def test_convtranspose_scale_fused_grouped_float16():
    inits = {"w": RNG.standard_normal((4, 3, 2, 2)).astype(F16), "k": RNG.uniform(0.5, 2, (6, 1, 1)).astype(F16)}
    proto = build(
        [helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2), helper.make_node("Mul", ["c", "k"], ["y"])],
        [("x", F16, [1, 4, 3, 3])], [("y", F16, [1, 6, 4, 4])], inits,
    )
    model, stats = run_pass(proto, "fuse_conv_bias", F16)
    assert stats.counts["conv_scales_fused"] == 1 and ops(model) == ["ConvTranspose"]


@pytest.mark.parametrize("case", ["spatial", "shared", "weight_input", "zero_divisor", "off"])
def test_conv_scale_refused(case):
    k = np.zeros((4, 1, 1), F32) if case == "zero_divisor" else RNG.uniform(0.5, 2, (4, 1, 1)).astype(F32)
    inits = {"w": RNG.standard_normal((4, 2, 3, 3)).astype(F32),
             "k": RNG.uniform(0.5, 2, (1, 1, 3, 3)).astype(F32) if case == "spatial" else k}
    inputs = [("x", F32, [1, 2, 5, 5])]
    if case == "weight_input":
        inputs.append(("w", F32, [4, 2, 3, 3]))
        del inits["w"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Div" if case == "zero_divisor" else "Mul", ["c", "k"], ["y"])]
    outputs = [("y", F32, [1, 4, 3, 3])]
    if case == "shared":
        nodes.append(helper.make_node("Relu", ["c"], ["z"]))
        outputs.append(("z", F32, [1, 4, 3, 3]))
    proto = build(nodes, inputs, outputs, inits)
    if case == "zero_divisor":  # x / 0 is inf or nan: compare structure only
        from onnxshrink import model_io
        from onnxshrink.pipeline import make_pass

        model = model_io.load(proto)
        stats = make_pass("fuse_conv_bias")(model).stats
    else:
        model, stats = run_pass(proto, "fuse_conv_bias", **({"scale": False} if case == "off" else {}))
    assert not stats.counts and len(ops(model)) >= 2
    reason = " | ".join(s.reason for s in stats.skipped)
    expected = {"spatial": "channel axis", "shared": "other users", "weight_input": "not a constant",
                "zero_divisor": "zeros", "off": ""}[case]
    assert expected in reason
