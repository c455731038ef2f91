"""Tests of ``eliminate_identities``: every rule fires where it must and stays put where it must not."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxshrink import checks, model_io
from onnxshrink.pipeline import make_pass
from tests import lossless
from tests.lossless import HEAD, ort_outputs


def run_pass(text: str | onnx.ModelProto, **options):
    """``eliminate_identities`` on a model, with every lossless check of ``tests.lossless.run_pass``."""
    return lossless.run_pass(text, "eliminate_identities", **options)


def ops(model) -> list[str]:
    return lossless.ops(model.graph)


def test_identity_removed_and_graph_output_keeps_name():
    model, stats = run_pass("""
        g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
            a = Identity(x)
            b = Relu(a)
            y = Identity(b)
            z = Identity(y)
        }""")
    # the x -> a identity goes; b -> y is renamed; z = Identity(y) must stay (y and z are both outputs)
    assert stats.counts["identity_removed"] == 2
    assert ops(model) == ["Relu", "Identity"]
    assert [v.name for v in model.graph.outputs] == ["y", "z"]


def test_identity_from_input_to_output_is_kept_with_reason():
    model, stats = run_pass("g (float[2] x) => (float[2] y) { y = Identity(x) }")
    assert ops(model) == ["Identity"] and not stats.counts
    assert stats.skipped and "graph input" in stats.skipped[0].reason


def test_dropout_inference_removed_training_kept():
    model, stats = run_pass("""
        g (float[4] x) => (float[4] y) <float r = {0.5}, float r0 = {0.0}, bool t = {1}> {
            a = Dropout(x)
            b = Dropout(a, r)
            c = Relu(b)
            y, m = Dropout(c, r0, t)
        }""")
    assert stats.counts["dropout_removed"] == 2
    assert ops(model) == ["Relu", "Dropout"]


def test_dropout_with_used_mask_kept():
    model, stats = run_pass("""
        g (float[4] x) => (float[4] y, bool[4] m) { y, m = Dropout(x) }""")
    assert ops(model) == ["Dropout"] and not stats.counts
    assert "mask" in stats.skipped[0].reason


def test_cast_and_castlike():
    model, stats = run_pass("""
        g (float[3] x, float[3] w) => (float[3] y, double[3] z, int64[3] k) {
            a = Cast<to=1>(x)
            b = CastLike(a, w)
            y = Relu(b)
            z = Cast<to=11>(x)
            i = Cast<to=7>(x)
            k = CastLike(i, i)
        }""")
    assert stats.counts["cast_removed"] == 3
    assert ops(model) == ["Relu", "Cast", "Cast"]


def test_reshape_flatten_same_shape():
    model, stats = run_pass("""
        g (float[N,12] x, float[2,3,4] u) => (float[N,12] y, float[2,12] v, float[6,4] w) {
            s1 = Constant<value = int64[2] {0, -1}>()
            a = Reshape(x, s1)
            b = Flatten<axis=1>(a)
            y = Relu(b)
            s2 = Constant<value = int64[3] {2, 3, 4}>()
            c = Reshape(u, s2)
            v = Flatten<axis=1>(c)
            s3 = Constant<value = int64[2] {6, 4}>()
            w = Reshape(u, s3)
        }""")
    assert stats.counts["reshape_removed"] == 3
    assert ops(model).count("Reshape") == 1 and ops(model).count("Flatten") == 1


def test_transpose_identity_and_merges():
    model, stats = run_pass("""
        g (float[2,3,4] x) => (float[2,3,4] y, float[4,3,2] z, float[3,2,4] w, float[3,4,2] v) {
            a = Transpose<perm=[0,1,2]>(x)
            b = Transpose<perm=[1,0,2]>(a)
            c = Transpose<perm=[1,0,2]>(b)
            y = Relu(c)
            d = Transpose<perm=[2,0,1]>(x)
            z = Transpose<perm=[0,2,1]>(d)
            e = Transpose<perm=[1,2,0]>(x)
            w = Transpose<perm=[0,2,1]>(e)
            v = Relu(e)
        }""")
    assert stats.counts["transpose_removed"] == 1
    assert stats.counts["transposes_merged"] == 2  # b∘c cancels; d∘z composes; e has another user
    perms = [list(n.attributes["perm"].as_ints()) for n in model.graph if n.op_type == "Transpose"]
    assert [2, 1, 0] in perms and len(perms) == 3


def test_expand_pad_slice_concat_split():
    model, stats = run_pass("""
        g (float[2,3] x) => (float[2,3] y, float[2,2,3] z, float[2,2] w, float[2,3] v) {
            s = Constant<value = int64[2] {1, 3}>()
            a = Expand(x, s)
            p = Constant<value = int64[4] {0, 0, 0, 0}>()
            b = Pad<mode="reflect">(a, p)
            st = Constant<value = int64[2] {0, 0}>()
            en = Constant<value = int64[2] {2, 9223372036854775807}>()
            c = Slice(b, st, en)
            d = Concat<axis=0>(c)
            e = Split<axis=0, num_outputs=1>(d)
            y = Relu(e)
            s2 = Constant<value = int64[3] {2, 1, 1}>()
            z = Expand(x, s2)
            en2 = Constant<value = int64[2] {2, 2}>()
            w = Slice(x, st, en2)
            xn = Neg(x)
            cc = Concat<axis=0>(xn, xn)
            h1, h2 = Split<axis=0, num_outputs=2>(cc)
            v = Add(h1, h2)
        }""")
    for key in ("expand_removed", "pad_removed", "slice_removed", "concat_removed", "split_removed"):
        assert stats.counts[key] == 1, key
    assert sorted(ops(model)) == sorted(
        ["Constant"] * 6 + ["Relu", "Expand", "Slice", "Neg", "Concat", "Split", "Add"]
    )


def test_nonzero_pad_kept():
    model, stats = run_pass("""
        g (float[2,3] x) => (float[2,5] y) {
            p = Constant<value = int64[4] {0, 1, 0, 1}>()
            y = Pad(x, p)
        }""")
    assert "Pad" in ops(model) and not stats.counts


def test_neutral_elements():
    model, stats = run_pass("""
        g (float[2,3] x, int64[3] k) => (float[2,3] y, float[2,3] z, float[2,2,3] w, int64[3] v) {
            one = Constant<value = float[1,3] {1, 1, 1}>()
            zero = Constant<value = float {0}>()
            a = Mul(one, x)
            b = Add(a, zero)
            c = Sub(b, zero)
            d = Div(c, one)
            y = Relu(d)
            z = Sub(zero, x)
            zeros = Constant<value = float[2,1,3] {0, 0, 0, 0, 0, 0}>()
            w = Add(x, zeros)
            ione = Constant<value = int64 {1}>()
            kn = Neg(k)
            v = Mul(kn, ione)
        }""")
    assert stats.counts["neutral_removed"] == 5
    assert sorted(n for n in ops(model) if n != "Constant") == ["Add", "Neg", "Relu", "Sub"]


def test_non_neutral_constant_kept():
    model, stats = run_pass("""
        g (float[2,3] x) => (float[2,3] y) {
            two = Constant<value = float {2}>()
            y = Mul(x, two)
        }""")
    assert "Mul" in ops(model) and not stats.counts


def test_squeeze_unsqueeze_pairs():
    model, stats = run_pass("""
        g (float[2,3] x, float[2,1,3] u) => (float[2,3] y, float[2,1,3] v, float[2,3,1] w) {
            ax = Constant<value = int64[1] {1}>()
            nax = Constant<value = int64[1] {-2}>()
            a = Unsqueeze(x, ax)
            b = Squeeze(a, nax)
            y = Relu(b)
            un = Neg(u)
            c = Squeeze(un, ax)
            v = Unsqueeze(c, ax)
            ax2 = Constant<value = int64[1] {2}>()
            w = Unsqueeze(c, ax2)
        }""")
    assert stats.counts["squeeze_pairs_removed"] == 2
    assert sorted(n for n in ops(model) if n != "Constant") == ["Neg", "Relu", "Squeeze", "Unsqueeze"]


def test_reshape_chains_merged():
    model, stats = run_pass("""
        g (float[2,3,4] x, float[N,6] u) => (float[3,4,2] y, float[3,8] z, float[N,6] w) {
            s1 = Constant<value = int64[2] {6, 4}>()
            s2 = Constant<value = int64[3] {3, 0, -1}>()
            a = Reshape(x, s1)
            y = Reshape(a, s2)
            b = Flatten<axis=2>(x)
            s3 = Constant<value = int64[2] {3, -1}>()
            z = Reshape(b, s3)
            s4 = Constant<value = int64[3] {0, 2, 3}>()
            c = Reshape(u, s4)
            s5 = Constant<value = int64[2] {0, -1}>()
            w = Reshape(c, s5)
        }""")
    assert stats.counts["reshapes_merged"] == 2
    # the last chain copies dim 0 of an intermediate whose dim 0 is not static
    assert any("copies" in s.reason for s in stats.skipped)
    assert ops(model).count("Reshape") == 4 and "Flatten" not in ops(model)


def test_long_reshape_chain_collapses_in_one_run():
    model, stats = run_pass("""
        g (float[3,1] x) => (float[3] y) {
            a = Neg(x)
            ax = Constant<value = int64[1] {0}>()
            b = Unsqueeze(a, ax)
            c = Unsqueeze(b, ax)
            d = Unsqueeze(c, ax)
            e = Unsqueeze(d, ax)
            s = Constant<value = int64[2] {3, 1}>()
            f = Reshape(e, s)
            one = Constant<value = int64[1] {1}>()
            y = Squeeze(f, one)
        }""")
    assert stats.counts["reshapes_merged"] == 4 and stats.counts["reshape_removed"] == 1
    assert [n for n in ops(model) if n != "Constant"] == ["Neg", "Squeeze"]


def test_if_subgraph():
    model, stats = run_pass("""
        g (bool c, float[3] x) => (float[3] y) {
            y = If(c) <
                then_branch = t () => (float[3] ty) { a = Identity(x)  ty = Relu(a) },
                else_branch = e () => (float[3] ey) {
                    one = Constant<value = float {1}>()
                    b = Neg(x)
                    ey = Mul(b, one)
                }
            >
        }""")
    assert stats.counts["identity_removed"] == 1
    assert stats.counts["neutral_removed"] == 1
    branches = [list(a.value) for a in model.graph[0].attributes.values()]
    assert all(n.op_type not in ("Identity", "Mul") for b in branches for n in b)


FUNCTION_MODEL = """
<ir_version: 8, opset_import: ["" : 18, "local" : 1]>
g (float[2,3] x) => (float[2,3] y) { y = local.f(x) }
<domain: "local", opset_import: ["" : 18]>
f (a) => (b) {
    r = Relu(a)
    t = Identity(r)
    u = Transpose<perm=[0,1]>(t)
    s = Constant<value = int64[1] {1}>()
    v = Unsqueeze(u, s)
    b = Squeeze(v, s)
}
"""


def test_function_body():
    proto = onnx.parser.parse_model(FUNCTION_MODEL)
    model, stats = run_pass(proto)
    assert stats.counts["identity_removed"] == 1
    assert stats.counts["transpose_removed"] == 1
    assert stats.counts["squeeze_pairs_removed"] == 1
    fn = next(iter(model.functions.values()))
    assert [n.op_type for n in fn] == ["Relu", "Constant"]
    assert fn.outputs[0].name == "b"


def test_without_shape_info_shape_rules_do_not_fire():
    proto = onnx.parser.parse_model(HEAD + """
        g (float[2,3] x) => (float[2,3] y) <int64[2] i = {0, 1}, int64[2] s = {2, 3}> {
            a = Gather(x, i)
            b = Cast<to=1>(a)
            c = Relu(b)
            y = Reshape(c, s)
        }""")
    model, stats = run_pass(proto, infer_shapes=False)
    assert ops(model) == ["Gather", "Cast", "Relu", "Reshape"]
    model, stats = run_pass(proto)
    assert stats.counts["cast_removed"] == 1 and stats.counts["reshape_removed"] == 1
    assert ops(model) == ["Gather", "Relu"]


def test_cast_dtype_proven_from_producer_without_shape_info():
    # Relu returns its input's type: the Cast to float is a no-op even with no value_info at all
    model, stats = run_pass("""
        g (float[2,3] x) => (float[2,3] y) {
            a = Relu(x)
            b = Cast<to=1>(a)
            y = Relu(b)
        }""", infer_shapes=False)
    assert stats.counts["cast_removed"] == 1 and ops(model) == ["Relu", "Relu"]


# ---------------------------------------------------------------- randomized chains


def _random_chain(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray]:
    """A chain of reshaping/no-op-ish ops on a random tensor; the numpy result tracks the shape."""
    shape = [int(rng.choice([1, 2, 3, 4])) for _ in range(rng.integers(1, 5))]
    arr = rng.standard_normal(shape).astype(np.float32)
    x, nodes, inits, outputs, cur = arr, [], [], [], "x"

    def const(a):
        inits.append(onnx.numpy_helper.from_array(np.asarray(a), f"c{len(inits)}"))
        return inits[-1].name

    for i in range(int(rng.integers(2, 8))):
        op, r, out = str(rng.choice(_CHAIN_OPS)), arr.ndim, f"v{i}"
        if r == 0 and op not in ("Unsqueeze", "Identity", "Cast"):
            continue
        if op == "Transpose":
            perm = [int(p) for p in (rng.permutation(r) if rng.random() < 0.7 else range(r))]
            nodes.append(onnx.helper.make_node(op, [cur], [out], perm=perm))
            arr = arr.transpose(perm)
        elif op == "Reshape":
            dims = list(arr.shape) if rng.random() < 0.3 else _factorize(rng, arr.size)
            target = [
                0 if i < r and d == arr.shape[i] and rng.random() < 0.5 else d for i, d in enumerate(dims)
            ]
            if rng.random() < 0.5:
                target[int(rng.integers(len(target)))] = -1
            nodes.append(onnx.helper.make_node(op, [cur, const(np.array(target, np.int64))], [out]))
            arr = arr.reshape(dims)
        elif op == "Squeeze" and 1 in arr.shape:
            axes = sorted({int(rng.choice([i for i, d in enumerate(arr.shape) if d == 1])) for _ in range(r)})
            signed = [a - r if rng.random() < 0.5 else a for a in axes]
            nodes.append(onnx.helper.make_node(op, [cur, const(np.array(signed, np.int64))], [out]))
            arr = arr.squeeze(tuple(axes))
        elif op == "Unsqueeze":
            axis = int(rng.integers(0, r + 1))
            signed = axis - r - 1 if rng.random() < 0.5 else axis
            nodes.append(onnx.helper.make_node(op, [cur, const(np.array([signed], np.int64))], [out]))
            arr = np.expand_dims(arr, axis)
        elif op == "Slice":
            axis = int(rng.integers(r))
            d = arr.shape[axis]
            start, end = int(rng.choice([0, -d, 1])), int(rng.choice([d, d + 5, 2**63 - 1, d - 1]))
            if arr[(slice(None),) * axis + (slice(start, end),)].size == 0:
                continue
            ins = [cur, *(const(np.array([v], np.int64)) for v in (start, end, axis))]
            nodes.append(onnx.helper.make_node(op, ins, [out]))
            arr = arr[(slice(None),) * axis + (slice(start, end),)]
        elif op in ("Expand", "Mul", "Add", "Sub"):
            shape = [int(rng.choice([1, d])) for d in arr.shape][int(rng.integers(0, r + 1)):]
            if rng.random() < 0.15:
                shape = [2] + [1] * r  # broadcasts the operand bigger: must stay
            if op == "Expand":
                nodes.append(onnx.helper.make_node(op, [cur, const(np.array(shape, np.int64))], [out]))
                arr = arr * np.ones(shape, np.float32)
            else:
                neutral = 1.0 if op == "Mul" else 0.0
                c = np.full(shape, neutral if rng.random() < 0.8 else 2.0, np.float32)
                ins = [cur, const(c)] if rng.random() < 0.6 else [const(c), cur]
                nodes.append(onnx.helper.make_node(op, ins, [out]))
                a, b = (arr, c) if ins[0] == cur else (c, arr)
                arr = {"Mul": a * b, "Add": a + b, "Sub": a - b}[op]
        elif op in ("Identity", "Cast"):
            nodes.append(onnx.helper.make_node(op, [cur], [out], **({"to": 1} if op == "Cast" else {})))
        else:
            continue
        if rng.random() < 0.15:
            outputs.append((out, arr.shape))
        cur = out
    nodes.append(onnx.helper.make_node("Neg", [cur], ["y"]))
    outs = [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(s))
        for n, s in [*outputs, ("y", arr.shape)]
    ]
    in_shape = list(x.shape) if rng.random() < 0.6 else ["N", *x.shape[1:]]
    graph = onnx.helper.make_graph(
        nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, in_shape)], outs,
        initializer=inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=8), x


_CHAIN_OPS = (
    "Transpose", "Transpose", "Reshape", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Expand",
    "Mul", "Add", "Sub", "Identity", "Cast",
)


def _factorize(rng: np.random.Generator, n: int) -> list[int]:
    dims = []
    for _ in range(int(rng.integers(1, 4))):
        d = int(rng.choice([d for d in range(1, n + 1) if n % d == 0]))
        dims.append(d)
        n //= d
    return [*dims, n]


def test_random_chains_match_onnxruntime():
    """200 random chains: every rewrite keeps outputs, passes the checks, and a second run finds nothing."""
    fired, rng = Counter(), np.random.default_rng(2024)
    for _ in range(200):
        proto, x = _random_chain(rng)
        model = model_io.load(proto)
        fired.update(make_pass("eliminate_identities")(model).stats.counts)
        make_pass("dead_code")(model)
        assert not make_pass("eliminate_identities")(model).modified
        assert checks.check_structure(model)
        after = onnx.load_from_string(model_io.to_bytes(model))
        assert [(o.name, o.type) for o in after.graph.output] == [
            (o.name, o.type) for o in proto.graph.output
        ]
        for want, got in zip(ort_outputs(proto, {"x": x}), ort_outputs(after, {"x": x})):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert min(fired.values()) > 0 and len(fired) >= 9, fired


FOCUS = """
    g (float[1,3,8,8] x) => (float[1,3,4,4] a, float[1,3,4,4] b) {
        s0 = Constant<value = int64[1] {0}>()
        s1 = Constant<value = int64[1] {1}>()
        big = Constant<value = int64[1] {9223372036854775807}>()
        two = Constant<value = int64[1] {2}>()
        ax2 = Constant<value = int64[1] {2}>()
        ax3 = Constant<value = int64[1] {-1}>()
        rows = Slice(x, s0, big, ax2, two)
        a = Slice(rows, s0, big, ax3, two)
        b = Slice(rows, s1, big, ax3, two)
    }"""


def test_slice_chain_on_disjoint_axes_is_merged_for_every_reader():
    # YOLOX's Focus: x[..., ::2, ::2] and x[..., ::2, 1::2] as a Slice shared by two Slices.
    model, stats = run_pass(FOCUS)  # run_pass checks the outputs against the original on ORT
    assert stats.counts["slices_merged"] == 1
    assert ops(model).count("Slice") == 2
    assert all(n.inputs[0].name == "x" for n in model.graph if n.op_type == "Slice")


@pytest.mark.parametrize("change, why, slices", [
    ("b = Slice(rows, s1, big, ax2, two)", "same axis in both", 3),
    ("b = Relu(rows)", "a reader that is not a Slice: the inner Slice would stay", 2),
])
def test_slice_chain_not_merged(change, why, slices):
    text = FOCUS.replace("b = Slice(rows, s1, big, ax3, two)", change)
    if "ax2, two)" in change:
        text = text.replace("float[1,3,4,4] b", "float[1,3,2,8] b")
    if "Relu" in change:
        text = text.replace("float[1,3,4,4] b", "float[1,3,4,8] b")
    model, stats = run_pass(text)
    assert not stats.counts.get("slices_merged"), why
    assert ops(model).count("Slice") == slices
