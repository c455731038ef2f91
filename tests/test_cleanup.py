"""Tests of the cleanup passes: ``dedup_initializers``, ``cse`` and ``dead_code``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
from onnx import helper, numpy_helper

from onnxshrink import model_io
from onnxshrink.pipeline import make_pass
from tests.lossless import HEAD, ops, reasons, run_pass

# ---------------------------------------------------------------- dedup_initializers


def test_dedup_merges_identical_initializers_only():
    model, stats = run_pass(
        """
        g (float[3] x) => (float[3] y)
          <float[3] a = {1, 2, 3}, float[3] b = {1, 2, 3}, float[3] c = {1, 2, 4}, int32[3] d = {1, 2, 3},
           float[3,1] e = {1, 2, 3}> {
            t = Add(x, a)
            u = Mul(t, b)
            v = Sub(u, c)
            dc = Cast <to = 1> (d)
            es = Squeeze(e)
            w = Add(v, dc)
            y = Add(w, es)
        }""",
        "dedup_initializers",
    )
    assert stats.counts["initializers_merged"] == 1 and stats.counts["bytes_saved"] == 12
    assert set(model.graph.initializers) == {"a", "c", "d", "e"}
    mul = next(n for n in model.graph if n.op_type == "Mul")
    assert mul.inputs[1].name == "a"


def test_dedup_never_merges_graph_inputs():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])
    a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])
    inits = [numpy_helper.from_array(np.ones(3, np.float32), n) for n in ("a", "b")]
    nodes = [helper.make_node("Add", ["x", "a"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x, a], [y], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model = model_io.load(proto)
    result = make_pass("dedup_initializers")(model)
    assert not result.modified and set(model.graph.initializers) == {"a", "b"}


def test_dedup_subgraph_initializer_merges_into_outer_one():
    model, stats = run_pass(
        """
        g (float[3] x, bool c) => (float[3] y) <float[3] a = {1, 2, 3}> {
            y = If (c) <
                then_branch = g1 () => (float[3] t) <float[3] a2 = {1, 2, 3}> { t = Add(x, a2) },
                else_branch = g2 () => (float[3] e) { e = Sub(x, a) }
            >
        }""",
        "dedup_initializers",
    )
    assert stats.counts["initializers_merged"] == 1
    then_g = model.graph[0].attributes["then_branch"].as_graph()
    assert not then_g.initializers and then_g[0].inputs[1] is model.graph.initializers["a"]


def test_dedup_streams_external_data(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    w2 = w.copy()
    w2[-1, -1] += 1  # same size, differs in the last byte block only
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "w1"), (w.copy(), "w2"), (w2, "w3"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["b"]),
        helper.make_node("MatMul", ["b", "w3"], ["y"]),
    ]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = model_io.load(path)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    result = make_pass("dedup_initializers")(model)
    assert result.stats.counts["initializers_merged"] == 1
    assert set(model.graph.initializers) == {"w1", "w3"}


def test_dedup_hashes_only_sample_collisions_once_per_tensor(tmp_path, monkeypatch):
    from onnxshrink.passes import _tensor_bytes

    hashed = []
    real_digest = _tensor_bytes.digest
    monkeypatch.setattr(_tensor_bytes, "digest", lambda t: hashed.append(t.name) or real_digest(t))
    rng = np.random.default_rng(0)
    big = rng.standard_normal((128, 256)).astype(np.float32)  # 128 KiB: sampled, not compared whole
    twin = big.copy()
    twin[40, 7] += 1  # same start, middle and end: only a hash tells them apart
    other = rng.standard_normal((128, 256)).astype(np.float32)  # differs in its sample: never hashed
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 128])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])
    inits = [numpy_helper.from_array(a, n) for a, n in ((big, "w1"), (twin, "w2"), (other, "w3"))]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]) for i in (1, 2, 3)]
    nodes += [helper.make_node("Sum", ["m1", "m2", "m3"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = model_io.load(path)
    dedup = make_pass("dedup_initializers")
    for _ in range(3):  # as in a fixed-point loop: the same pass instance, the same tensors
        assert not dedup(model).modified
    assert sorted(hashed) == ["w1", "w2"]


# ---------------------------------------------------------------- cse


def test_cse_merges_chains_and_constants_in_one_run():
    model, stats = run_pass(
        """
        g (float[2,3] x) => (float[2,3] y) {
            r1 = Relu(x)
            r2 = Relu(x)
            s1 = Sigmoid(r1)
            s2 = Sigmoid(r2)
            k1 = Constant <value = float[3] {1, 2, 3}> ()
            k2 = Constant <value = float[3] {1, 2, 3}> ()
            m = Mul(s1, k1)
            n = Mul(s2, k2)
            y = Add(m, n)
        }""",
        "cse",
    )
    assert stats.counts["nodes_merged"] == 4
    assert ops(model.graph) == ["Relu", "Sigmoid", "Constant", "Mul", "Add"]
    add = model.graph[4]
    assert add.inputs[0] is add.inputs[1]


def test_cse_refuses_random_ops_and_differing_attributes():
    text = """
        g (float[3] x) => (float[3] y) {
            r1 = RandomNormal <shape = [3], seed = 1.0> ()
            r2 = RandomNormal <shape = [3], seed = 1.0> ()
            a = LeakyRelu <alpha = 0.1> (x)
            b = LeakyRelu <alpha = 0.2> (x)
            z = Constant <value_float = 0.0> ()
            nz = Constant <value_float = -0.0> ()
            p = Add(r1, r2)
            q = Add(a, b)
            t = Add(p, q)
            zz = Add(z, nz)
            y = Add(t, zz)
        }"""
    model = model_io.load(onnx.parser.parse_model(HEAD + text))
    result = make_pass("cse")(model)
    assert not result.modified and len(model.graph) == 11
    assert "non-deterministic" in reasons(result.stats)


def test_cse_keeps_both_graph_outputs_and_renames_when_only_one_is():
    model, stats = run_pass(
        """
        g (float[3] x) => (float[3] y, float[3] z, float[3] w, float[3] v) {
            y = Relu(x)
            z = Relu(x)
            a = Neg(x)
            w = Neg(x)
            v = Add(a, y)
        }""",
        "cse",
    )
    assert "are graph outputs" in reasons(stats)
    assert ops(model.graph) == ["Relu", "Relu", "Neg", "Add"]
    assert [v.name for v in model.graph.outputs] == ["y", "z", "w", "v"]
    assert model.graph[3].inputs[0] is model.graph.outputs[2]


def test_cse_in_subgraph_and_function():
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18, "local" : 1]>
        g (float[3] x, bool c) => (float[3] y, float[3] z) {
            y = If (c) <
                then_branch = g1 () => (float[3] t) { t1 = Exp(x)\n t2 = Exp(x)\n t = Add(t1, t2) },
                else_branch = g2 () => (float[3] e) { e = Neg(x) }
            >
            z = local.Twice(x)
        }
        <domain: "local", opset_import: ["" : 18]>
        Twice (a) => (b) {
            p = Abs(a)
            q = Abs(a)
            b = Mul(p, q)
        }""")
    model, stats = run_pass(proto, "cse")
    assert stats.counts["nodes_merged"] == 2
    then_g = model.graph[0].attributes["then_branch"].as_graph()
    assert ops(then_g) == ["Exp", "Add"]
    assert ops(next(iter(model.functions.values()))) == ["Abs", "Mul"]


def test_cse_linear_on_a_wide_graph():
    n = 2000
    nodes = [helper.make_node("Relu", ["x"], [f"r{i}"]) for i in range(n)]
    nodes += [helper.make_node("Sum", [f"r{i}" for i in range(n)], ["y"])]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = model_io.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    result = make_pass("cse")(model)
    assert result.stats.counts["nodes_merged"] == n - 1
    assert ops(model.graph) == ["Relu", "Sum"]


# ---------------------------------------------------------------- dead_code


def test_dead_code_keeps_outer_values_used_only_in_subgraphs():
    model, stats = run_pass(
        """
        g (float[3] x, bool c) => (float[3] y) <float[3] a = {1, 2, 3}, float[3] unused = {0, 0, 0}> {
            k = Neg(a)
            dead = Exp(x)
            y = If (c) <
                then_branch = g1 () => (float[3] t) <float[3] inner_unused = {1, 1, 1}> {
                    d = Sin(x)
                    t = Add(x, k)
                },
                else_branch = g2 () => (float[3] e) { e = Sub(x, a) }
            >
        }""",
        "dead_code",
    )
    assert stats.counts["nodes_removed"] == 2  # dead (outer) and d (inside the branch)
    assert stats.counts["initializers_removed"] == 2  # unused and inner_unused
    assert ops(model.graph) == ["Neg", "If"] and "a" in model.graph.initializers
    then_g = model.graph[1].attributes["then_branch"].as_graph()
    assert ops(then_g) == ["Add"] and not then_g.initializers


def test_dead_code_removes_unused_opset_imports_but_keeps_signatures():
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18, "local" : 1, "unused.domain" : 1, "ai.onnx.ml" : 3]>
        g (float[3] x, float[3] spare, int64 n, bool c) => (float[3] y, float[3] z) {
            y = local.First(x, x)
            z = Loop (n, c, x) <
                body = body (int64 i, bool ci, float[3] acc) => (bool co, float[3] out) {
                    co = Identity(ci)
                    out = Neg(acc)
                }
            >
        }
        <domain: "local", opset_import: ["" : 18, "unused.domain" : 1]>
        First (a, b) => (o) { o = Neg(a) }""")
    model, stats = run_pass(proto, "dead_code")
    assert stats.counts["opset_imports_removed"] == 3
    assert set(model.opset_imports) == {"", "local"}
    fn = next(iter(model.functions.values()))
    assert set(fn.opset_imports) == {""}
    assert [v.name for v in fn.inputs] == ["a", "b"]  # unused b stays: it is the signature
    body = model.graph[1].attributes["body"].as_graph()
    assert [v.name for v in body.inputs] == ["i", "ci", "acc"]  # fixed by the Loop spec
    assert [v.name for v in model.graph.inputs] == ["x", "spare", "n", "c"]


def test_dead_code_keeps_graph_input_initializers():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [x, w],
            [y],
            [numpy_helper.from_array(np.ones(3, np.float32), "w")],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    model = model_io.load(proto)
    result = make_pass("dead_code")(model)
    assert not result.modified and "w" in model.graph.initializers


def test_lossless_cleanup_order_on_a_model_with_everything():
    # fold -> cse -> dedup -> dead_code, run by the pipeline's pass list, composes.
    from onnxshrink import api

    text = """
        g (float[N,4] x) => (float[N,4] y) <float[4] a = {1, 2, 3, 4}, float[4] b = {1, 2, 3, 4}> {
            s1 = Add(a, a)
            s2 = Add(b, b)
            r1 = Relu(x)
            r2 = Relu(x)
            m = Mul(r1, s1)
            n = Mul(r2, s2)
            y = Add(m, n)
        }"""
    proto = onnx.parser.parse_model(HEAD + text)
    result = api.optimize(proto, passes=["fold_constants", "cse", "dedup_initializers", "cse", "dead_code"])
    assert ops(result.model.graph) == ["Relu", "Mul", "Add"]
    assert len(result.model.graph.initializers) == 1
