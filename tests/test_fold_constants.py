"""Tests of ``fold_constants``: evaluation, static shape chains, If inlining, guard rails, subgraphs,
functions, idempotence and a linear-size chain."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import helper, numpy_helper

from onnxshrink import model_io
from onnxshrink.data import input_specs, random_feed
from onnxshrink.errors import ConfigError
from onnxshrink.pipeline import make_pass
from tests.lossless import HEAD, ops, ort_outputs, reasons, run_pass


def fold(text, **options):
    return run_pass(text, "fold_constants", **options)


def test_constant_chain_folds_into_one_initializer():
    model, stats = fold("""
        g (float[2,3] x) => (float[2,3] y) <float[3] a = {1, 2, 3}, float[3] b = {4, 5, 6}> {
            s = Add(a, b)
            t = Mul(s, a)
            u = Sqrt(t)
            y = Add(x, u)
        }""")
    assert ops(model.graph) == ["Add"]
    assert stats.counts["nodes_folded"] == 3
    assert stats.counts["bytes_created"] == 3 * 12
    folded = model.graph[0].inputs[1]
    assert folded.name == "u" and folded.is_initializer()
    np.testing.assert_allclose(folded.const_value.numpy(), np.sqrt([5, 14, 27]), rtol=1e-6)
    assert stats.notes["evaluations"] == 3


def test_static_shape_chain_folds():
    model, stats = fold("""
        g (float[2,3,4] x) => (float[2,12] y, int64 n) {
            r = Relu(x)
            s = Shape <start = 1> (r)
            p = ReduceProd <keepdims = 1> (s)
            s0 = Shape <end = 1> (r)
            shp = Concat <axis = 0> (s0, p)
            y = Reshape(r, shp)
            n = Size(r)
        }""")
    assert "Shape" not in ops(model.graph) and "Size" not in ops(model.graph)
    assert ops(model.graph) == ["Relu", "Reshape", "Constant"]  # the Constant is graph output n
    assert stats.counts["shape_ops_folded"] == 3
    assert stats.counts["nodes_folded"] == 2
    shape_in = model.graph[1].inputs[1]
    assert shape_in.const_value.numpy().tolist() == [2, 12]
    assert model.graph.outputs[1].name == "n"
    assert model.graph.outputs[1].producer().op_type == "Constant"


def test_shape_inference_fills_missing_shapes():
    # No value_info for r: the pass runs shape inference to learn r's static shape.
    model, stats = fold("""
        g (float[2,6] x) => (float[2,6] y) {
            r = Relu(x)
            s = Shape(r)
            i = Constant <value = int64[1] {0}> ()
            d = Gather <axis = 0> (s, i)
            c = Constant <value = int64[1] {-1}> ()
            shp = Concat <axis = 0> (c, d)
            t = Reshape(r, shp)
            y = Transpose <perm = [1, 0]> (t)
        }""")
    assert ops(model.graph) == ["Relu", "Reshape", "Transpose"]
    assert stats.counts["shape_ops_folded"] == 1 and stats.counts["nodes_folded"] == 2
    assert stats.counts["constants_to_initializers"] == 2
    assert [v.name for v in model.graph.initializers.values()] == ["shp"]  # i, c, d: used up


def test_dynamic_batch_reshape_gets_copy_dims():
    model, stats = fold(
        """
        g (float[N,3,4] x) => (float[N,12] y) <int64[1] i1 = {0}, int64[1] m1 = {-1}> {
            s = Shape(x)
            i = Constant <value = int64 {0}> ()
            b = Gather <axis = 0> (s, i)
            b1 = Unsqueeze(b, i1)
            shp = Concat <axis = 0> (b1, m1)
            y = Reshape(x, shp)
        }""",
        dims={"N": 5},
    )
    assert stats.counts["reshape_shapes_folded"] == 1
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, -1]
    dead = make_pass("dead_code")(model)
    assert (
        ops(model.graph) == ["Reshape"] and dead.stats.counts["nodes_removed"] == 4
    )  # the Constant is an initializer


RESHAPE_OTHER = """
    g (float[N,3,4] x) => (float[N,12] y) <int64 i = {0}, int64[1] i1 = {0}, int64[1] m1 = {-1}> {
        r = Transpose <perm = PERM> (x)
        s = Shape(x)
        b = Gather <axis = 0> (s, i)
        b1 = Unsqueeze(b, i1)
        shp = Concat <axis = 0> (b1, m1)
        y = Reshape(r, shp)
    }"""


def test_reshape_of_another_value_uses_dim_param_names():
    # The dim comes from Shape(x), the Reshape data is r: both carry dim_param N at position 0.
    model, stats = fold(RESHAPE_OTHER.replace("PERM", "[0, 2, 1]"), dims={"N": 2})
    assert stats.counts["reshape_shapes_folded"] == 1
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, -1]


@pytest.mark.parametrize("perm, trust", [("[0, 2, 1]", False), ("[1, 0, 2]", True)])
def test_reshape_dim_of_another_value_or_position_is_not_copied(perm, trust):
    # Untrusted names, or N sitting at another position of the Reshape input: no rewrite.
    text = RESHAPE_OTHER.replace("PERM", perm)
    if perm == "[1, 0, 2]":
        text = text.replace("=> (float[N,12] y)", "=> (float[N,N] y)")
    model = model_io.load(onnx.parser.parse_model(HEAD + text))
    result = make_pass("fold_constants", trust_dim_params=trust)(model)
    assert "reshape_shapes_folded" not in result.stats.counts


def test_folded_graph_output_keeps_its_name():
    model, stats = fold("""
        g (float[3] x) => (float[3] y, float[3] k) <float[3] a = {1, 2, 3}> {
            k = Mul(a, a)
            y = Add(x, k)
        }""")
    assert [v.name for v in model.graph.outputs] == ["y", "k"]
    producer = model.graph.outputs[1].producer()
    assert producer.op_type == "Constant"
    assert model.graph[1].inputs[1] is model.graph.outputs[1]
    assert stats.counts["nodes_folded"] == 1


@pytest.mark.parametrize(
    "body, reason",
    [
        ("r = RandomNormal <shape = [3]> ()\n y = Add(x, r)", "non-deterministic"),
        ("r = Dropout(a, ratio, train)\n y = Add(x, r)", "non-deterministic"),
        ("r = DequantizeLinear(q, scale)\n y = Add(x, r)", "undo quantization"),
        ("r = ConstantOfShape <value = float[1] {1}> (big)\n y = Add(x, r)", "max_output_bytes"),
        ("r = ConstantOfShape <value = float[1] {1}> (mid)\n y = Add(x, r)", "max_growth"),
    ],
)
def test_guard_rails_refuse_with_reason(body, reason):
    text = (
        "g (float[3] x) => (float[N] y) <float[3] a = {1, 2, 3}, float ratio = {0.5}, bool train = {1},"
        " int8[3] q = {1, 2, 3}, float scale = {0.5}, int64[1] big = {600000}, int64[1] mid = {3000}> {"
        + body
        + "}"
    )
    proto = onnx.parser.parse_model(HEAD + text)
    model = model_io.load(proto)
    n_before = len(model.graph)
    result = make_pass("fold_constants")(model)
    assert not result.modified and len(model.graph) == n_before
    assert reason in reasons(result.stats)


def test_custom_domain_and_graph_input_initializers_are_not_folded():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])
    nodes = [
        helper.make_node("Mul", ["w", "w"], ["ww"]),  # w is also a graph input: not constant
        helper.make_node("Relu", ["c"], ["cr"], domain="custom.ops"),
        helper.make_node("Add", ["x", "ww"], ["y0"]),
        helper.make_node("Add", ["y0", "cr"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.ones(3, np.float32), n) for n in ("w", "c")]
    graph = helper.make_graph(nodes, "g", [x, w], [y], inits)
    model = model_io.load(
        helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("custom.ops", 1)]
        )
    )
    result = make_pass("fold_constants")(model)
    assert not result.modified
    assert "domain 'custom.ops'" in reasons(result.stats)


def test_small_output_limit_is_configurable_and_config_is_checked():
    text = "g (float[3] x) => (float[3] y) <float[3] a = {1, 2, 3}> { s = Add(a, a)\n y = Add(x, s) }"
    model = model_io.load(onnx.parser.parse_model(HEAD + text))
    result = make_pass("fold_constants", max_output_bytes=8)(model)
    assert not result.modified and "12 bytes > max_output_bytes=8" in reasons(result.stats)
    with pytest.raises(ConfigError):
        make_pass("fold_constants", evaluator="magic")
    model, stats = fold(text, evaluator="reference")
    assert stats.counts["nodes_folded"] == 1


def test_constant_if_is_inlined():
    model, stats = fold("""
        g (float[3] x) => (float[3] y, float[3] z) <float[3] a = {1, 2, 3}, bool cond = {1}> {
            y = If (cond) <
                then_branch = then_g () => (float[3] t) { t0 = Mul(a, a)\n t = Add(x, t0) },
                else_branch = else_g () => (float[3] e) { e = Sub(x, a) }
            >
            z = Neg(y)
        }""")
    assert stats.counts["if_inlined"] == 1 and stats.counts["nodes_folded"] == 1
    assert ops(model.graph) == ["Add", "Neg"]
    assert [v.name for v in model.graph.outputs] == ["y", "z"]


def test_constant_if_with_name_clash_is_skipped():
    text = """
        g (float[3] x, bool c2) => (float[3] y, float[3] w) <bool cond = {0}, float[3] a = {1, 2, 3}> {
            y = If (cond) <
                then_branch = g1 () => (float[3] t) { t = Add(x, a) },
                else_branch = g2 () => (float[3] e) { e = Sub(x, a) }
            >
            w = If (c2) <
                then_branch = g3 () => (float[3] e) { e = Mul(x, a) },
                else_branch = g4 () => (float[3] t2) { t2 = Neg(x) }
            >
        }"""
    model = model_io.load(onnx.parser.parse_model(HEAD + text))
    result = make_pass("fold_constants")(model)
    assert not result.modified and ops(model.graph) == ["If", "If"]
    assert "names used elsewhere" in reasons(result.stats) and "'e'" in reasons(result.stats)


def test_folds_inside_if_and_loop_bodies_with_outer_constants():
    model, stats = fold("""
        g (float[3] x, bool c, int64 n) => (float[3] y, float[3] z) <float[3] a = {1, 2, 3}> {
            y = If (c) <
                then_branch = g1 () => (float[3] t) { t0 = Mul(a, a)\n t = Add(x, t0) },
                else_branch = g2 () => (float[3] e) { e = Sub(x, a) }
            >
            z = Loop (n, c, x) <
                body = body (int64 i, bool ci, float[3] acc) => (bool co, float[3] out) {
                    co = Identity(ci)
                    two = Constant <value = float {2}> ()
                    k = Mul(a, two)
                    out = Add(acc, k)
                }
            >
        }""")
    assert stats.counts["nodes_folded"] == 2
    then_g = model.graph[0].attributes["then_branch"].as_graph()
    body = model.graph[1].attributes["body"].as_graph()
    assert ops(then_g) == ["Add"] and "Mul" not in ops(body)
    assert then_g[0].inputs[1].is_initializer()


def test_folds_inside_functions_with_constant_nodes():
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18, "local" : 1]>
        g (float[3] x) => (float[3] y) { y = local.AddTwo(x) }
        <domain: "local", opset_import: ["" : 18]>
        AddTwo (a) => (b) {
            one = Constant <value_float = 1.0> ()
            two = Add(one, one)
            b = Add(a, two)
        }""")
    model, stats = fold(proto)
    fn = next(iter(model.functions.values()))
    assert stats.counts["nodes_folded"] == 1
    assert ops(fn) == ["Constant", "Constant", "Add"]
    assert fn[1].outputs[0].const_value.numpy() == 2.0


def test_chain_of_5000_folds_in_one_pass_with_one_evaluation_per_node():
    n = 5000
    nodes = [helper.make_node("Add", [f"v{i}", "one"], [f"v{i + 1}"]) for i in range(n)]
    nodes.append(helper.make_node("Add", ["x", f"v{n}"], ["y"]))
    inits = [
        numpy_helper.from_array(np.zeros(2, np.float32), "v0"),
        numpy_helper.from_array(np.ones(2, np.float32), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        inits,
    )
    model = model_io.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    result = make_pass("fold_constants")(model)
    assert result.stats.counts["nodes_folded"] == n
    assert result.stats.notes["evaluations"] == n
    assert len(model.graph) == 1
    np.testing.assert_array_equal(model.graph[0].inputs[1].const_value.numpy(), [n, n])


def test_if_returning_a_branch_initializer_keeps_output_name():
    model, stats = fold("""
        g (float[3] x) => (float[3] y, float[3] z) <float[3] a = {1, 2, 3}, bool cond = {0}> {
            y = If (cond) <
                then_branch = g1 () => (float[3] t) { t = Add(x, a) },
                else_branch = g2 () => (float[3] e) <float[3] e = {7, 8, 9}> { }
            >
            z = Add(x, y)
        }""")
    assert stats.counts["if_inlined"] == 1
    assert ops(model.graph) == ["Constant", "Add"]  # Identity(e) for graph output y, folded
    assert model.graph.outputs[0].name == "y" and model.graph.outputs[0].producer().op_type == "Constant"


def test_slice_squeeze_cast_chain_on_static_dims():
    model, stats = fold(
        """
        g (float[N,3,4,5] x) => (int32[3] r, int64 k)
          <int64[1] s0 = {-1}, int64[1] e0 = {-1000}, int64[1] big = {1000}, int64[1] st = {-1}, int64[1] z = {0}> {
            s = Shape(x)
            rev = Slice(s, s0, e0, z, st)
            rv = Slice(rev, z, s0)
            r = Cast <to = 6> (rv)
            kk = Slice(s, s0, big)
            k = Squeeze(kk, z)
        }""",
        dims={"N": 2},
    )
    make_pass("dead_code")(model)  # Shape(x) and the reversed slice are dead now
    assert ops(model.graph) == ["Constant", "Constant"]
    out = {v.name: v for v in model.graph.outputs}
    assert out["r"].producer().attributes["value"].as_tensor().numpy().tolist() == [5, 4, 3]
    assert out["k"].producer().attributes["value"].as_tensor().numpy().tolist() == 5
    assert stats.counts["shape_ops_folded"] == 2  # rv and kk: static slices of a partly dynamic shape


def test_bundled_demo_shape_chain_folds(tmp_path):
    from onnxshrink import api

    demo = model_io.Path(__file__).resolve().parent.parent / "onnxshrink" / "bundled" / "demo.onnx"
    result = api.optimize(
        demo,
        tmp_path / "out.onnx",
        passes=["fold_constants", "cse", "dedup_initializers", "dead_code"],
    )
    kinds = [n.op_type for n in result.model.graph]
    assert not {"Shape", "Gather", "Concat"} & set(kinds)
    passes = result.report.per_pass()
    assert passes["fold_constants"]["counts"]["reshape_shapes_folded"] == 1
    reshape = next(n for n in result.model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, -1]
    before, after = onnx.load(str(demo)), (tmp_path / "out.onnx").read_bytes()
    for batch in (1, 3):
        feed = random_feed(input_specs(model_io.load(demo)), batch, {"batch": batch})
        for w, g in zip(ort_outputs(before, feed), ort_outputs(after, feed)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
