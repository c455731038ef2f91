"""``fold_scalar_scales``: a scalar Mul/Div sunk into the constant weights it scales."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.test_fusions import F16, F32, RNG, build, ops, run_pass


def _attention_scores(scale_op: str = "Div", shape_first: bool = False):
    """``(Q Kᵀ) / 4`` with Q = Transpose(Reshape(x W + b)), K = Transpose(Reshape(x V)): Q's path ends at W."""
    inits = {"w": RNG.standard_normal((8, 8)).astype(F32), "b": RNG.standard_normal(8).astype(F32),
             "v": RNG.standard_normal((8, 8)).astype(F32), "shape": np.array([0, 0, 2, 4], np.int64),
             "k": np.array(4.0 if scale_op == "Div" else 0.25, F32)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["qm"]), helper.make_node("Add", ["b", "qm"], ["qa"]),
        helper.make_node("Reshape", ["qa", "shape"], ["qr"]),
        helper.make_node("Transpose", ["qr"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["x", "v"], ["km"]), helper.make_node("Reshape", ["km", "shape"], ["kr"]),
        helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node(scale_op, ["k", "s"] if shape_first else ["s", "k"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["y"], axis=-1),
    ]
    return build(nodes, [("x", F32, [2, 3, 8])], [("y", F32, [2, 2, 3, 3])], inits)


@pytest.mark.parametrize(("op", "first"), [("Div", False), ("Mul", True), ("Mul", False)])
def test_attention_scale_sunk_into_q_projection(op, first):
    model, stats = run_pass(_attention_scores(op, first), "fold_scalar_scales")
    assert stats.counts["scales_folded"] == 1
    assert ops(model) == ["MatMul", "Add", "Reshape", "Transpose", "MatMul", "Reshape", "Transpose", "MatMul",
                          "Softmax"]


@pytest.mark.parametrize("terminal", ["gemm", "conv", "mul"])
def test_scale_absorbed_by_gemm_conv_and_constant_mul(terminal):
    if terminal == "gemm":
        inits = {"w": RNG.standard_normal((4, 5)).astype(F32), "b": RNG.standard_normal(5).astype(F32),
                 "k": np.array(3.0, F32)}
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], alpha=0.5),
                 helper.make_node("Mul", ["g", "k"], ["y"])]
        proto = build(nodes, [("x", F32, [2, 4])], [("y", F32, [2, 5])], inits)
    elif terminal == "conv":
        inits = {"w": RNG.standard_normal((3, 2, 3, 3)).astype(F16), "b": RNG.standard_normal(3).astype(F16),
                 "k": np.array(2.5, F16)}
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
                 helper.make_node("Div", ["f", "k"], ["y"])]
        proto = build(nodes, [("x", F16, [1, 2, 4, 4])], [("y", F16, [1, 12])], inits)
    else:
        inits = {"m": RNG.standard_normal((1, 4)).astype(F32), "k": np.array(-2.0, F32)}
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "m"], ["p"]),
                 helper.make_node("Mul", ["k", "p"], ["y"])]
        proto = build(nodes, [("x", F32, [3, 4])], [("y", F32, [3, 4])], inits)
    model, stats = run_pass(proto, "fold_scalar_scales", F16 if terminal == "conv" else F32)
    assert stats.counts["scales_folded"] == 1
    assert len(ops(model)) == len(proto.graph.node) - 1


@pytest.mark.parametrize("case", ["nonlinear", "shared", "weight_input", "const_minus", "rank"])
def test_scale_not_folded(case):
    inits = {"w": RNG.standard_normal((4, 4)).astype(F32), "k": np.array(3.0, F32),
             "b": RNG.standard_normal(4).astype(F32)}
    inputs, outputs = [("x", F32, [2, 4])], [("y", F32, [2, 4])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "k"], ["y"])]
    if case == "nonlinear":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
                 helper.make_node("Mul", ["r", "k"], ["y"])]
    elif case == "shared":
        outputs.append(("m", F32, [2, 4]))
    elif case == "weight_input":
        inputs.append(("w", F32, [4, 4]))
        del inits["w"]
    elif case == "const_minus":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Sub", ["b", "m"], ["s"]),
                 helper.make_node("Mul", ["s", "k"], ["y"])]
    elif case == "rank":  # a [1,1,1] factor makes the [2,4] result rank 3
        inits["k"] = np.full((1, 1, 1), 3.0, F32)
        outputs = [("y", F32, [1, 2, 4])]
    model, stats = run_pass(build(nodes, inputs, outputs, inits), "fold_scalar_scales")
    assert not stats.counts and "Mul" in ops(model)
