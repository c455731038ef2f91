"""``eliminate_identities`` without value_info: neutral elements proven from producers, and Cast chains."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnxshrink.passes import _value_facts as vf

from tests import lossless


def run_pass(text: str, **options):
    return lossless.run_pass(text, "eliminate_identities", **options)


def ops(model) -> list[str]:
    return lossless.ops(model.graph)


# ---------------------------------------------------------------- neutral elements, shapes unknown

# A Reshape to a shape computed from an input: onnx shape inference cannot tell the rank after it, so
# nothing downstream carries a shape (as in Paddle exports). The Conv weight still fixes the rank.
_UNKNOWN_RANK = """
    g (float[1,2,4,4] x, int64[K] s) => (float[1,3,4,4] y) <float[3,2,1,1] w = {1, 2, 3, 4, 5, 6}, float[1] one = {1.0},
                                                           float[1,1,1,1,1] one5 = {1.0}> {
        n = Neg(s)
        m = Neg(n)
        r = Reshape(x, m)
        c = Conv(r, w)
        d = Relu(c)
        e = EXPR
        y = Relu(e)
    }"""


@pytest.mark.parametrize("infer", [False, True])
def test_mul_by_one_after_conv_removed_with_no_shapes(infer):
    model, stats = run_pass(_UNKNOWN_RANK.replace("EXPR", "Mul(d, one)"), dims={}, infer_shapes=infer,
                            feeds=_feeds())
    assert stats.counts["neutral_removed"] == 1
    assert "Mul" not in ops(model)


def test_mul_by_ones_of_higher_rank_than_conv_kept():
    # d has rank 4; a [1,1,1,1,1] constant would broadcast it to rank 5: must not fire
    model, stats = run_pass(
        _UNKNOWN_RANK.replace("float[1,3,4,4] y", "float[1,1,3,4,4] y").replace("EXPR", "Mul(d, one5)"),
        infer_shapes=False, feeds=_feeds())
    assert "Mul" in ops(model) and not stats.counts


def test_mul_by_one_of_unknown_rank_operand_skipped_with_reason():
    model, stats = run_pass("""
        g (float[1,2,4,4] x, int64[K] s) => (float[1,2,4,4] y) <float[1,1] one = {1.0}> {
            n = Neg(s)
            m = Neg(n)
            r = Reshape(x, m)
            e = Mul(r, one)
            y = Relu(e)
        }""", feeds=_feeds())
    assert "Mul" in ops(model)
    assert "rank is unknown" in lossless.reasons(stats)


def _feeds():
    import numpy as np

    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32), "s": np.array([1, 2, 4, 4], np.int64)}]


def test_min_rank_and_known_dtype_from_producers():
    x = ir.Value(name="x")
    w = ir.Value(name="w", shape=ir.Shape([3, 2, 1, 1]), type=ir.TensorType(ir.DataType.FLOAT16))
    conv = ir.Node("", "Conv", [x, w])
    relu = ir.Node("", "Relu", [conv.outputs[0]])
    shape = ir.Node("", "Shape", [relu.outputs[0]])
    assert vf.min_rank(relu.outputs[0]) == 4
    assert vf.known_dtype(relu.outputs[0]) == ir.DataType.FLOAT16
    assert vf.known_dtype(shape.outputs[0]) == ir.DataType.INT64
    assert vf.min_rank(x) is None and vf.known_dtype(x) is None


# ---------------------------------------------------------------- Cast chains


def test_widening_round_trips_removed():
    model, stats = run_pass("""
        g (int32[3] a, float[3] f, uint8[3] u) => (int32[3] y, float[3] z, uint8[3] v) {
            a64 = Cast<to=7>(a)
            a32 = Cast<to=6>(a64)
            y = Neg(a32)
            fd = Cast<to=11>(f)
            f32 = Cast<to=1>(fd)
            z = Neg(f32)
            uf = Cast<to=1>(u)
            u8 = Cast<to=2>(uf)
            v = Abs(u8)
        }""")
    assert stats.counts["casts_merged"] == 3
    assert ops(model) == ["Neg", "Neg", "Abs"]


def test_widening_round_trip_through_movers():
    # int32 -> int64 -> Slice -> Transpose -> int32: the Slice and Transpose run on int32
    model, stats = run_pass("""
        g (int32[4,3] a) => (int32[2,3] y) <int64[1] s0 = {1}, int64[1] s1 = {3}> {
            b = Cast<to=7>(a)
            c = Slice(b, s0, s1)
            d = Transpose<perm=[1,0]>(c)
            e = Transpose<perm=[1,0]>(d)
            f = Neg(e)
            y = Cast<to=6>(f)
        }""")
    assert "Cast" in ops(model)  # Neg is not a mover: nothing merges
    model, stats = run_pass("""
        g (int32[4,3] a) => (int32[3,2] y) <int64[1] s0 = {1}, int64[1] s1 = {3}> {
            b = Cast<to=7>(a)
            c = Slice(b, s0, s1)
            d = Transpose<perm=[1,0]>(c)
            y = Cast<to=6>(d)
        }""")
    assert stats.counts["casts_merged"] == 1 and ops(model) == ["Slice", "Transpose"]
    assert model.graph.outputs[0].dtype == ir.DataType.INT32


def test_narrowing_round_trip_of_symbolic_shape_kept():
    # Shape -> Cast(int32) -> Slice -> Cast(int64): a dim of 2**31 or more would wrap; not provable
    model, stats = run_pass("""
        g (float[N,3,H,W] x) => (int64[1] y) <int64[1] s0 = {3}, int64[1] s1 = {4}> {
            s = Shape(x)
            t = Cast<to=6>(s)
            u = Slice(t, s0, s1)
            y = Cast<to=7>(u)
        }""", dims={"N": 1, "H": 2, "W": 5})
    assert ops(model).count("Cast") == 2 and not stats.counts


def test_narrowing_round_trip_of_static_dims_removed():
    model, stats = run_pass("""
        g (float[2,3,4,5] x) => (int64[1] y) <int64[1] s0 = {3}, int64[1] s1 = {4}> {
            s = Shape(x)
            t = Cast<to=6>(s)
            u = Slice(t, s0, s1)
            y = Cast<to=7>(u)
        }""")
    assert stats.counts["casts_merged"] == 1 and ops(model) == ["Shape", "Slice"]


def test_adjacent_casts_collapse_only_when_exact():
    model, stats = run_pass("""
        g (int8[3] a, float[3] f, float[3] g) => (float[3] y, float[3] z, float16[3] h) {
            b = Cast<to=6>(a)
            y = Cast<to=1>(b)
            c = Cast<to=6>(f)
            z = Cast<to=1>(c)
            d = Cast<to=11>(g)
            h = Cast<to=10>(d)
        }""")
    # int8 -> int32 -> float == int8 -> float; float -> double -> half == float -> half;
    # float -> int32 -> float truncates: kept
    assert stats.counts["casts_merged"] == 2
    assert ops(model).count("Cast") == 4


def test_holds_all_table():
    D = ir.DataType
    assert vf.holds_all(D.INT32, D.INT64) and vf.holds_all(D.UINT8, D.FLOAT16) and vf.holds_all(D.BOOL, D.INT8)
    assert vf.holds_all(D.FLOAT16, D.FLOAT) and vf.holds_all(D.BFLOAT16, D.DOUBLE)
    assert not vf.holds_all(D.INT64, D.INT32) and not vf.holds_all(D.INT32, D.FLOAT)
    assert not vf.holds_all(D.INT64, D.DOUBLE) and not vf.holds_all(D.FLOAT, D.INT64)
    assert not vf.holds_all(D.FLOAT16, D.BFLOAT16) and not vf.holds_all(D.UINT16, D.FLOAT16)
    assert not vf.holds_all(D.INT8, D.UINT8) and not vf.holds_all(D.INT8, D.BOOL)


# ---------------------------------------------------------------- reductions of one element


def test_reduce_over_size_one_axes_removed():
    # silero VAD's tail: Squeeze -> ReduceMean(axis 1, keepdims 0) -> Unsqueeze(axis 1) of an [N, 1]
    model, stats = run_pass("""
        g (float[N,1,1] x, float[N,1,4] z) => (float[N,1] y, float[N,1,4] w)
          <int64[1] one = {1}, int64[1] neg = {-2}> {
            s = Sigmoid(x)
            q = Squeeze(s, one)
            m = ReduceMean<keepdims=0>(q, one)
            y = Unsqueeze(m, one)
            t = Tanh(z)
            k = ReduceMax<keepdims=1>(t, neg)
            w = Relu(k)
        }""", dims={"N": 3})
    assert stats.counts["reduce_removed"] == 2
    assert ops(model) == ["Sigmoid", "Squeeze", "Tanh", "Relu"]


_KEPT_REDUCTIONS = {
    # a dim of 2 is reduced: the mean is not the element
    "not_one": """g (float[N,2] x) => (float[N,1] y) <int64[1] one = {1}> {
        m = ReduceSum<keepdims=0>(x, one)
        y = Unsqueeze(m, one)
    }""",
    # L2 of one element is its absolute value
    "l2": """g (float[N,1] x) => (float[N,1] y) <int64[1] one = {1}> {
        m = ReduceL2<keepdims=0>(x, one)
        y = Unsqueeze(m, one)
    }""",
    # the Unsqueeze puts the axis back elsewhere: [N] -> [1, N]
    "other_axis": """g (float[N,1] x) => (float[1,N] y) <int64[1] one = {1}, int64[1] zero = {0}> {
        m = ReduceSum<keepdims=0>(x, one)
        y = Unsqueeze(m, zero)
    }""",
    # the reduced value is read elsewhere too
    "shared": """g (float[N,1] x) => (float[N,1] y, float[N] r) <int64[1] one = {1}> {
        m = ReduceSum<keepdims=0>(x, one)
        r = Neg(m)
        y = Unsqueeze(m, one)
    }""",
}


@pytest.mark.parametrize("case", sorted(_KEPT_REDUCTIONS))
def test_reduce_that_changes_values_kept(case):
    model, stats = run_pass(_KEPT_REDUCTIONS[case], dims={"N": 3})
    assert "reduce_removed" not in stats.counts
    assert any(o.startswith("Reduce") for o in ops(model))


def test_gather_of_wrapped_scalar_unwrapped():
    model, stats = run_pass("""
        g (int64 sr, float f, float[1] v) => (bool y, float z, float w)
          <int64[1] flat = {-1}, int64 zero = {0}, int64 last = {-1}, int64 k = {16000}, int64[1] ax = {0}> {
            r = Reshape(sr, flat)
            s = Gather(r, zero)
            y = Equal(s, k)
            u = Unsqueeze(f, ax)
            t = Gather<axis=0>(u, last)
            z = Neg(t)
            e = Gather(v, zero)
            w = Neg(e)
        }""")
    assert stats.counts["gathers_unwrapped"] == 2
    assert ops(model) == ["Equal", "Neg", "Gather", "Neg"]  # v is not a wrapped scalar: its Gather stays
