"""Tests of ``fuse_batchnorm``, ``fuse_conv_bias`` and ``fuse_gemm``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import checks, model_io
from onnxshrink.data import input_specs, random_feed
from onnxshrink.pipeline import make_pass
from tests.lossless import interface, ort_outputs

RNG = np.random.default_rng(0)
F32, F16 = np.float32, np.float16


def build(nodes, inputs, outputs, inits=None, opset=18, functions=()):
    """A model from helper nodes; ``inputs``/``outputs`` are (name, numpy dtype, shape) triples."""

    def vi(name, dtype, shape):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)

    graph = helper.make_graph(
        nodes,
        "g",
        [vi(*i) for i in inputs],
        [vi(*o) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in (inits or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("local", 1)] if functions else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8, functions=list(functions))


def run_pass(proto: onnx.ModelProto, name: str, dtype=F32, **options):
    """Run a pass and check the lossless contract; return (model, stats).

    Like ``tests.lossless.run_pass``, with float16 tolerances (rtol/atol 1e-2: the fused weights are
    rounded to float16 once, the unfused model rounds after each op) and three random feeds.
    """
    onnx.checker.check_model(proto, full_check=True)
    model = model_io.load(proto)
    before = interface(model)
    result = make_pass(name, **options)(model)
    report = checks.check_structure(model)
    assert report, report.problems
    assert interface(model) == before
    after = onnx.load_from_string(model_io.to_bytes(model))
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == F32 else {"rtol": 1e-2, "atol": 1e-2}
    specs = input_specs(model)
    for seed in range(3):
        feed = random_feed(specs, seed, dims={})
        for w, g in zip(ort_outputs(proto, feed), ort_outputs(after, feed)):
            assert w.dtype == g.dtype and w.shape == g.shape
            np.testing.assert_allclose(g.astype(F32), w.astype(F32), **tol)
    again = make_pass(name, **options)(model)
    assert not again.modified, f"second run still changed: {dict(again.stats.counts)}"
    return model, result.stats


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph if n.op_type != "Constant"]


def bn_params(c, dtype=F32, prefix="bn"):
    return {
        f"{prefix}_s": RNG.uniform(0.5, 1.5, c).astype(dtype),
        f"{prefix}_b": RNG.standard_normal(c).astype(dtype),
        f"{prefix}_m": RNG.standard_normal(c).astype(dtype),
        f"{prefix}_v": RNG.uniform(0.5, 2, c).astype(dtype),
    }


def bn_node(x, y, prefix="bn", **attrs):
    return helper.make_node("BatchNormalization", [x, *(f"{prefix}_{k}" for k in "sbmv")], [y], **attrs)


# ---------------------------------------------------------------- fuse_batchnorm


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_fused(dtype, bias):
    w = RNG.standard_normal((6, 2, 3, 3)).astype(dtype)
    inits = {"w": w, **bn_params(6, dtype)}
    conv_in = ["x", "w"]
    if bias:
        inits["b"] = RNG.standard_normal(6).astype(dtype)
        conv_in.append("b")
    proto = build(
        [helper.make_node("Conv", conv_in, ["c"], group=2, pads=[1, 1, 1, 1]), bn_node("c", "y")],
        [("x", dtype, [1, 4, 5, 5])],
        [("y", dtype, [1, 6, 5, 5])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_batchnorm", dtype)
    assert stats.counts["batchnorms_fused"] == 1 and ops(model) == ["Conv"]
    conv = model.graph[0]
    assert conv.inputs[1].dtype == conv.inputs[2].dtype == model.graph.inputs[0].dtype
    assert conv.outputs[0].name == "y"  # the BN output was a graph output: its name is kept
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w)  # copied


def test_convtranspose_bn_fused_grouped():
    inits = {"w": RNG.standard_normal((4, 3, 2, 2)).astype(F32), **bn_params(6)}
    proto = build(
        [
            helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2),
            bn_node("c", "t"),
            helper.make_node("Relu", ["t"], ["y"]),
        ],
        [("x", F32, [1, 4, 3, 3])],
        [("y", F32, [1, 6, 4, 4])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_batchnorm")
    assert stats.counts["batchnorms_fused"] == 1 and ops(model) == ["ConvTranspose", "Relu"]


def test_gemm_bn_fused():
    inits = {
        "w": RNG.standard_normal((5, 3)).astype(F32),
        "c": RNG.standard_normal((2, 5)).astype(F32),
        **bn_params(5),
    }
    proto = build(
        [helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=1, alpha=2.0, beta=0.5), bn_node("g", "y")],
        [("x", F32, [2, 3])],
        [("y", F32, [2, 5])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_batchnorm")
    assert stats.counts["batchnorms_fused"] == 1 and ops(model) == ["Gemm"]


def test_matmul_bn_becomes_gemm_and_3d_matmul_is_refused():
    inits = {"w": RNG.standard_normal((3, 4)).astype(F32), **bn_params(4), **bn_params(5, prefix="b3")}
    proto = build(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            bn_node("m", "y"),
            helper.make_node("MatMul", ["z", "w"], ["m3"]),
            bn_node("m3", "y3", prefix="b3"),
        ],
        [("x", F32, ["N", 3]), ("z", F32, [2, 5, 3])],
        [("y", F32, ["N", 4]), ("y3", F32, [2, 5, 4])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_batchnorm")
    assert stats.counts["batchnorms_fused"] == 1
    assert ops(model) == ["Gemm", "MatMul", "BatchNormalization"]
    assert any("axis 1" in s.reason for s in stats.skipped)


def test_bn_refusals():
    inits = {"w": RNG.standard_normal((4, 4, 1, 1)).astype(F32), **bn_params(4), **bn_params(4, prefix="t")}
    proto = build(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),  # output feeds the BN and a Relu
            bn_node("c", "y"),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["x", "wi"], ["c2"]),  # weight is a graph input
            bn_node("c2", "y2", prefix="t"),
        ],
        [("x", F32, [1, 4, 3, 3]), ("wi", F32, [4, 4, 1, 1])],
        [("y", F32, [1, 4, 3, 3]), ("r", F32, [1, 4, 3, 3]), ("y2", F32, [1, 4, 3, 3])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_batchnorm")
    assert not stats.counts and ops(model).count("BatchNormalization") == 2
    reasons = " | ".join(s.reason for s in stats.skipped)
    assert "other users" in reasons and "not a constant" in reasons


def test_bn_training_mode_not_fused():
    inits = {"w": RNG.standard_normal((4, 4, 1, 1)).astype(F32), **bn_params(4)}
    proto = build(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", training_mode=1)],
        [("x", F32, [1, 4, 3, 3])],
        [("y", F32, [1, 4, 3, 3])],
        inits,
    )
    model = model_io.load(proto)  # ORT has no training-mode BatchNormalization: check structure only
    stats = make_pass("fuse_batchnorm")(model).stats
    assert not stats.counts and "training" in stats.skipped[0].reason
    assert ops(model) == ["Conv", "BatchNormalization"]


def test_shared_weight_is_copied_not_mutated():
    w = RNG.standard_normal((4, 4, 1, 1)).astype(F32)
    proto = build(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            bn_node("c", "y"),
            helper.make_node("Conv", ["x", "w"], ["z"]),
        ],
        [("x", F32, [1, 4, 3, 3])],
        [("y", F32, [1, 4, 3, 3]), ("z", F32, [1, 4, 3, 3])],
        {"w": w, **bn_params(4)},
    )
    model, stats = run_pass(proto, "fuse_batchnorm")
    assert stats.counts["batchnorms_fused"] == 1
    first, second = model.graph[0], model.graph[1]
    assert first.inputs[1].name != "w" and second.inputs[1].name == "w"
    np.testing.assert_array_equal(second.inputs[1].const_value.numpy(), w)


def test_bn_in_if_branch():
    branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "ty")],
        "then",
        [],
        [helper.make_tensor_value_info("ty", TensorProto.FLOAT, [1, 4, 3, 3])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["ey"])],
        "else",
        [],
        [helper.make_tensor_value_info("ey", TensorProto.FLOAT, [1, 4, 3, 3])],
    )
    proto = build(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)],
        [("cond", np.bool_, []), ("x", F32, [1, 4, 3, 3])],
        [("y", F32, [1, 4, 3, 3])],
        {"w": RNG.standard_normal((4, 4, 1, 1)).astype(F32), **bn_params(4)},
    )
    model, stats = run_pass(proto, "fuse_batchnorm")
    assert stats.counts["batchnorms_fused"] == 1
    then = model.graph[0].attributes["then_branch"].value
    assert [n.op_type for n in then] == ["Conv"] and len(then.initializers) == 2


# ---------------------------------------------------------------- fuse_conv_bias


@pytest.mark.parametrize(
    "shape, op, bias",
    [
        ((4, 1, 1), "Add", False),
        ((1, 4, 1, 1), "Add", True),
        ((), "Add", False),
        ((4, 1, 1), "Sub", True),
        ((1,), "Add", True),
    ],
)
def test_conv_bias_fused(shape, op, bias):
    inits = {"w": RNG.standard_normal((4, 2, 3, 3)).astype(F32), "k": RNG.standard_normal(shape).astype(F32)}
    conv_in = ["x", "w"] + (["b"] if bias else [])
    if bias:
        inits["b"] = RNG.standard_normal(4).astype(F32)
    proto = build(
        [helper.make_node("Conv", conv_in, ["c"]), helper.make_node(op, ["c", "k"], ["y"])],
        [("x", F32, [2, 2, 5, 5])],
        [("y", F32, [2, 4, 3, 3])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_conv_bias")
    assert stats.counts["conv_biases_fused"] == 1 and ops(model) == ["Conv"]


def test_convtranspose_bias_fused():
    inits = {
        "w": RNG.standard_normal((4, 3, 2, 2)).astype(F32),
        "k": RNG.standard_normal((6, 1, 1)).astype(F32),
    }
    proto = build(
        [
            helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2),
            helper.make_node("Add", ["c", "k"], ["y"]),
        ],
        [("x", F32, [1, 4, 3, 3])],
        [("y", F32, [1, 6, 4, 4])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_conv_bias")
    assert stats.counts["conv_biases_fused"] == 1 and ops(model) == ["ConvTranspose"]


@pytest.mark.parametrize("dtype", [F32, F16])
def test_conv1d_bias_constant_first(dtype):
    inits = {
        "w": RNG.standard_normal((3, 2, 3)).astype(dtype),
        "k": RNG.standard_normal((3, 1)).astype(dtype),
    }
    proto = build(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Add", ["k", "c"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
        ],
        [("x", dtype, [1, 2, 7])],
        [("y", dtype, [1, 3, 5])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_conv_bias", dtype)
    assert stats.counts["conv_biases_fused"] == 1 and ops(model) == ["Conv", "Relu"]
    assert model.graph[0].inputs[2].dtype == model.graph.inputs[0].dtype


@pytest.mark.parametrize("shape", [(4,), (1, 1, 3, 3), (2, 4, 1, 1)])
def test_conv_bias_refused_for_spatial_constants(shape):
    # (4,) lines up with the last spatial axis (width 4), not the channels
    inits = {"w": RNG.standard_normal((4, 2, 3, 3)).astype(F32), "k": RNG.standard_normal(shape).astype(F32)}
    out = [2, 4, 3, 4] if shape == (4,) else [2, 4, 3, 3]
    x = [2 if shape != (2, 4, 1, 1) else 1, 2, 5, out[3] + 2]
    out[0] = x[0] if shape != (2, 4, 1, 1) else 2
    proto = build(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "k"], ["y"])],
        [("x", F32, x)],
        [("y", F32, out)],
        inits,
    )
    model, stats = run_pass(proto, "fuse_conv_bias")
    assert not stats.counts and ops(model) == ["Conv", "Add"]
    assert "channel axis" in stats.skipped[0].reason


def test_conv_bias_refused_with_second_consumer():
    inits = {
        "w": RNG.standard_normal((4, 2, 1, 1)).astype(F32),
        "k": RNG.standard_normal((4, 1, 1)).astype(F32),
    }
    proto = build(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Add", ["c", "k"], ["y"]),
            helper.make_node("Relu", ["c"], ["z"]),
        ],
        [("x", F32, [1, 2, 3, 3])],
        [("y", F32, [1, 4, 3, 3]), ("z", F32, [1, 4, 3, 3])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_conv_bias")
    assert not stats.counts and "other users" in stats.skipped[0].reason
    assert ops(model) == ["Conv", "Add", "Relu"]


def test_conv_bias_in_function():
    fn = onnx.parser.parse_function("""
        <domain: "local", opset_import: ["" : 18]>
        f (x) => (y) {
            w = Constant<value = float[2,2,1,1] {1, 2, 3, 4}>()
            k = Constant<value = float[2,1,1] {0.5, -1}>()
            c = Conv(x, w)
            y = Add(c, k)
        }""")
    proto = build(
        [helper.make_node("f", ["x"], ["y"], domain="local")],
        [("x", F32, [1, 2, 3, 3])],
        [("y", F32, [1, 2, 3, 3])],
        functions=[fn],
    )
    model, stats = run_pass(proto, "fuse_conv_bias")
    assert stats.counts["conv_biases_fused"] == 1
    body = next(iter(model.functions.values()))
    assert [n.op_type for n in body if n.op_type != "Constant"] == ["Conv"]


# ---------------------------------------------------------------- fuse_gemm


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("c_shape, swap", [((4,), False), ((3, 4), True), ((3, 1), False)])
def test_matmul_add_to_gemm(dtype, c_shape, swap):
    inits = {"w": RNG.standard_normal((5, 4)).astype(dtype), "k": RNG.standard_normal(c_shape).astype(dtype)}
    add_in = ["k", "m"] if swap else ["m", "k"]
    proto = build(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", add_in, ["y"])],
        [("x", dtype, [3, 5])],
        [("y", dtype, [3, 4])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_gemm", dtype)
    assert stats.counts["matmul_add_fused"] == 1 and ops(model) == ["Gemm"]
    assert model.graph[0].outputs[0].name == "y"


def test_matmul_add_refusals():
    inits = {"w": RNG.standard_normal((5, 4)).astype(F32), "k": RNG.standard_normal(4).astype(F32)}
    proto = build(
        [
            helper.make_node("MatMul", ["x3", "w"], ["m3"]),
            helper.make_node("Add", ["m3", "k"], ["y3"]),
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "k"], ["y"]),
            helper.make_node("Relu", ["m"], ["r"]),
        ],
        [("x3", F32, [2, 3, 5]), ("x", F32, [3, 5])],
        [("y3", F32, [2, 3, 4]), ("y", F32, [3, 4]), ("r", F32, [3, 4])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_gemm")
    assert not stats.counts and "Gemm" not in ops(model)
    reasons = " | ".join(s.reason for s in stats.skipped)
    assert "2-D" in reasons and "other users" in reasons


def test_matmul_add_can_be_turned_off():
    inits = {"w": RNG.standard_normal((5, 4)).astype(F32), "k": RNG.standard_normal(4).astype(F32)}
    proto = build(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "k"], ["y"])],
        [("x", F32, [3, 5])],
        [("y", F32, [3, 4])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_gemm", matmul_add=False)
    assert not stats.counts and ops(model) == ["MatMul", "Add"]


@pytest.mark.parametrize("with_c", [False, True])
def test_gemm_add_constant(with_c):
    inits = {"w": RNG.standard_normal((5, 4)).astype(F32), "k": RNG.standard_normal((1, 4)).astype(F32)}
    gemm_in = ["x", "w"]
    if with_c:
        inits["c"] = RNG.standard_normal((3, 1)).astype(F32)
        gemm_in.append("c")
    proto = build(
        [
            helper.make_node("Gemm", gemm_in, ["g"], beta=0.5, transA=1),
            helper.make_node("Add", ["g", "k"], ["y"]),
        ],
        [("x", F32, [5, 3])],
        [("y", F32, [3, 4])],
        inits,
    )
    model, stats = run_pass(proto, "fuse_gemm")
    assert stats.counts["gemm_add_fused"] == 1 and ops(model) == ["Gemm"]
    assert "beta" not in model.graph[0].attributes


def test_matmul_add_in_main_graph_and_branch_get_distinct_names():
    def dense(x, out, tag):
        return [
            helper.make_node("MatMul", [x, "w"], [f"m{tag}"]),
            helper.make_node("Add", [f"m{tag}", "k"], [out]),
        ]

    then = helper.make_graph(
        [*dense("h", "ta", "t"), helper.make_node("Relu", ["ta"], ["ty"])],
        "then",
        [],
        [helper.make_tensor_value_info("ty", TensorProto.FLOAT, [3, 4])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["ey"])],
        "else",
        [],
        [helper.make_tensor_value_info("ey", TensorProto.FLOAT, [3, 4])],
    )
    proto = build(
        [*dense("x", "h", "g"), helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [("cond", np.bool_, []), ("x", F32, [3, 4])],
        [("y", F32, [3, 4])],
        {"w": RNG.standard_normal((4, 4)).astype(F32), "k": RNG.standard_normal(4).astype(F32)},
    )
    model, stats = run_pass(proto, "fuse_gemm")  # ORT and the checker reject repeated value names
    assert stats.counts["matmul_add_fused"] == 2
    branch = model.graph[1].attributes["then_branch"].value
    assert [n.op_type for n in branch] == ["Gemm", "Relu"] and branch[0].outputs[0].name == "ta"
    assert model.graph[0].outputs[0].name == "h"
