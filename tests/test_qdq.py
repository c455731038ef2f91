"""Tests of the qdq pass, its placement rules and its arithmetic (``passes/qdq*.py``, ``_qdq_*.py``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxshrink.passes import _qdq_math as qm
from onnxshrink.passes.qdq import QDQPass
from onnxshrink.passes.qdq_rules import PlanOptions, plan_qdq

from onnxshrink import model_io
from onnxshrink.errors import ConfigError, UnsupportedModelError
from onnxshrink.qdq_fusion import fusion_report
from tests.qdq_helpers import (
    const,
    cosine,
    dq_feeding,
    feeds_for,
    model,
    nodes,
    ort_run,
    prepare,
    run_qdq,
    weights,
)


@dataclasses.dataclass(frozen=True)
class R:
    min: float
    max: float


# ---------------------------------------------------------------- arithmetic vs a numpy reference


@pytest.mark.parametrize("lo,hi", [(-1.5, 4.2), (0.3, 2.0), (-3.0, -0.5), (-1e-3, 1e-3)])
def test_uint8_asymmetric_params_match_reference(lo, hi):
    p = qm.activation_params(lo, hi, "uint8")
    rmin, rmax = min(lo, 0.0), max(hi, 0.0)  # the range always holds 0
    scale = np.float32((rmax - rmin) / 255.0)
    zp = int(np.clip(np.rint(-rmin / float(scale)), 0, 255))
    assert p.scale == scale and p.zero_point == zp and p.zero_point.dtype == np.uint8
    x = np.linspace(rmin, rmax, 101, dtype=np.float32)
    back = (qm.quantize_activation(x, p).astype(np.float32) - zp) * scale
    assert np.max(np.abs(back - x)) <= scale * 0.5 + 1e-7
    assert (qm.quantize_activation(np.float32(0), p).astype(int) - zp) == 0  # 0 is exact


def test_int8_symmetric_params_and_nonnegative_ranges():
    p = qm.activation_params(-2.0, 1.0, "int8")
    assert p.zero_point == 0 and p.zero_point.dtype == np.int8
    assert p.scale == np.float32(2.0 / 127)
    relu = qm.activation_params(0.0, 6.0, "int8")  # a folded Relu: all of [-128, 127] for [0, 6]
    assert relu.zero_point == -128 and relu.scale == np.float32(6.0 / 255)


@pytest.mark.parametrize("qtype", ["uint8", "int8"])
def test_zero_and_tiny_ranges_give_finite_positive_scales(qtype):
    for lo, hi in [(0.0, 0.0), (0.0, 1e-30), (-1e-40, 0.0)]:
        p = qm.activation_params(lo, hi, qtype)
        p.check("t")
        assert np.isfinite(p.scale) and p.scale > 0
    with pytest.raises(ValueError):
        qm.activation_params(float("nan"), 1.0, qtype)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_weight_params_symmetric_per_channel_match_reference(axis):
    w = weights(6, 4, 3, 3)
    w[2] = 0.0  # an all-zero output channel
    p = qm.weight_params(w, axis)
    reduce_axes = tuple(i for i in range(4) if i != axis) if axis is not None else None
    absmax = np.max(np.abs(w), axis=reduce_axes)
    ref = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    np.testing.assert_array_equal(p.scale, ref)
    assert p.zero_point.dtype == np.int8 and not p.zero_point.any()
    q = qm.quantize_weight(w, p)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    shape = [1] * 4
    if axis is not None:
        shape[axis] = -1
    err = np.abs(q.astype(np.float32) * p.scale.reshape(shape) - w)
    assert np.all(err <= p.scale.reshape(shape) / 2 + 1e-7)
    q7 = qm.quantize_weight(w, qm.weight_params(w, axis, reduce_range=True), reduce_range=True)
    assert q7.min() >= -64 and q7.max() <= 64


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_weight_scales_and_codes_equal_the_float64_reference(dtype):
    """``abs_max`` (in the weight's own type) and ``quantize_weight`` (rounded in place) give the scales
    and codes of the plain float64 / float32 formulas, to the bit: every dtype, per channel along each
    axis, per tensor, a 0-d weight, a zero and a negative extreme."""
    rng = np.random.default_rng(1)
    for shape, axis in [((16, 3, 3, 3), 0), ((64, 32), 1), ((64, 32), 0), ((8, 8), None), ((), None)]:
        w = (rng.standard_normal(shape) * 3).astype(dtype)
        if w.size > 1:
            w.flat[0], w.flat[1] = -2 * np.abs(w).max(), 0.0
        axes = None if axis is None else tuple(i for i in range(w.ndim) if i != axis)
        for narrow, qmax in ((False, 127), (True, 64)):
            ref = qm._scale(np.abs(np.asarray(w, np.float64)).max(axis=axes), qmax)
            got = qm.symmetric_scale(w, 0, axes, "7bit" if narrow else None)
            assert got.dtype == ref.dtype and np.array_equal(got, ref)
            p = qm.QParams(got, np.zeros(got.shape, np.int8), axis)
            s = qm._broadcast(got, w.ndim, axis)
            codes = np.clip(np.rint(np.asarray(w, np.float32) / s), -qmax, qmax).astype(np.int8)
            assert np.array_equal(qm.quantize_weight(w, p, narrow), codes)


def test_bias_int32_and_overflow_guard():
    b = np.array([0.5, -1.25, 3.0], np.float32)
    sx, sw = np.float32(0.02), np.array([0.01, 0.003, 0.5], np.float32)
    s = qm.bias_scale(sx, sw)
    np.testing.assert_array_equal(qm.quantize_bias(b, s), np.rint(b / (sx * sw)).astype(np.int32))
    tiny = np.array([1e-12, 0.01, 0.01], np.float32)  # channel 0 would overflow int32
    fitted = qm.fit_weight_scale_to_bias(np.array([1e3, 1.0, 1.0]), sx, tiny)
    assert fitted[0] > tiny[0] and np.array_equal(fitted[1:], tiny[1:])
    assert np.abs(1e3 / (sx * fitted[0])) <= qm.INT32_LIMIT


# ---------------------------------------------------------------- structure per op kind

HEAD = "x = Conv <pads=[1,1,1,1]> (inp, W1, B1)\n"
CONV_INITS = {"W1": weights(8, 4, 3, 3), "B1": weights(8)}


def _conv_net(middle: str, tail_in: int, extra: dict | None = None, out_shape="float[1,6,8,8]"):
    text = f"""g (float[1,4,8,8] inp) => ({out_shape} out) {{
        {HEAD}{middle}
        out = Conv <pads=[1,1,1,1]> (m, W2, B2)
    }}"""
    inits = {**CONV_INITS, "W2": weights(6, tail_in, 3, 3), "B2": weights(6), **(extra or {})}
    return model(text, inits)


CASES = {
    "Conv": (_conv_net("m = Identity(x)", 8), "QLinearConv"),
    "Add": (_conv_net("y = Conv <pads=[1,1,1,1]> (inp, W3, B3)\nm = Add(x, y)", 8,
                      {"W3": weights(8, 4, 3, 3), "B3": weights(8)}), "com.microsoft.QLinearAdd"),
    "Mul": (_conv_net("y = Conv <pads=[1,1,1,1]> (inp, W3, B3)\nm = Mul(x, y)", 8,
                      {"W3": weights(8, 4, 3, 3), "B3": weights(8)}), "com.microsoft.QLinearMul"),
    "AveragePool": (_conv_net("m = AveragePool <kernel_shape=[3,3], pads=[1,1,1,1]> (x)", 8),
                    "com.microsoft.QLinearAveragePool"),
    "Sigmoid": (_conv_net("m = Sigmoid(x)", 8), "com.microsoft.QLinearSigmoid"),
    "LeakyRelu": (_conv_net("m = LeakyRelu <alpha=0.1> (x)", 8), "com.microsoft.QLinearLeakyRelu"),
    "Concat": (_conv_net("y = Conv <pads=[1,1,1,1]> (inp, W3, B3)\nm = Concat <axis=1> (x, y)", 12,
                         {"W3": weights(4, 4, 3, 3, scale=2.0), "B3": weights(4)}),
               "com.microsoft.QLinearConcat"),
    "MaxPool": (_conv_net("m = MaxPool <kernel_shape=[2,2], strides=[2,2]> (x)", 8,
                          out_shape="float[1,6,4,4]"), "MaxPool"),
    "GlobalAveragePool": (_conv_net("m = GlobalAveragePool(x)", 8, out_shape="float[1,6,1,1]"),
                          "com.microsoft.QLinearGlobalAveragePool"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_kind_is_quantized_and_fused_by_ort(case, tmp_path):
    proto, fused = CASES[case]
    feeds = feeds_for(proto)
    m, result, _ = run_qdq(proto, feeds)
    assert result.modified and not result.stats.skipped
    target = nodes(m, case)[-1] if case != "Conv" else nodes(m, "Conv")[0]
    for i, v in enumerate(target.inputs):
        if v is not None and (case == "Conv" or i == 0 or case in ("Add", "Mul", "Concat")):
            assert dq_feeding(target, i) is not None, f"{case} input {i} is not dequantized"
    path = model_io.save(m, tmp_path / "q.onnx")
    report = fusion_report(path)
    assert report, str(report)
    assert fused in report.ops, report.ops
    assert report.ops["QuantizeLinear"] == 1 and report.ops["DequantizeLinear"] == 1, report.ops  # in, out
    ref, got = ort_run(proto, feeds[0])[0], ort_run(path, feeds[0])[0]
    assert cosine(ref, got) > 0.995


def test_conv_weights_per_channel_bias_int32_and_relu_folded():
    proto = _conv_net("m = Relu(x)", 8)
    m, result, table = run_qdq(proto, feeds_for(proto), reduce_range_ops=())  # 8-bit weights
    assert result.stats.counts["relus_folded"] == 1 and not nodes(m, "Relu")
    conv = nodes(m, "Conv")[0]
    xdq, wdq, bdq = (dq_feeding(conv, i) for i in range(3))
    w_q, w_s = const(wdq.inputs[0]), const(wdq.inputs[1])
    assert w_q.dtype == np.int8 and w_s.shape == (8,) and wdq.attributes["axis"].as_int() == 0
    np.testing.assert_array_equal(w_s, np.max(np.abs(CONV_INITS["W1"]), axis=(1, 2, 3)) / np.float32(127))
    assert wdq.inputs[0].producer() is None  # a weight: int8 initializer, no QuantizeLinear
    s_x = const(xdq.inputs[1])
    b_q, b_s = const(bdq.inputs[0]), const(bdq.inputs[1])
    assert b_q.dtype == np.int32 and not const(bdq.inputs[2]).any()
    np.testing.assert_array_equal(b_s, np.float32(s_x) * w_s)
    np.testing.assert_array_equal(b_q, np.rint(CONV_INITS["B1"] / (np.float32(s_x) * w_s)).astype(np.int32))
    # the folded Relu: the conv output's Q saturates at 0 (uint8 zero point 0)
    q = next(n for n in nodes(m, "QuantizeLinear") if n.inputs[0] is conv.outputs[0])
    assert const(q.inputs[2]) == 0 and const(q.inputs[2]).dtype == np.uint8
    assert np.isclose(const(q.inputs[1]) * 255, table["x"].max, rtol=1e-5)


def test_a_weight_read_by_two_layers_is_stored_once():
    """Two MatMuls reading one weight with the same encoding share its int8 codes and DequantizeLinear;
    a weight read once gets its own."""
    proto = model("""g (float[2,16] inp) => (float[2,8] out) {
        a = MatMul(inp, W)
        b = MatMul(inp, W)
        c = Add(a, b)
        out = MatMul(c, V)
    }""", {"W": weights(16, 8, seed=3), "V": weights(8, 8, seed=4)})
    feeds = feeds_for(proto)
    m, result, _ = run_qdq(proto, feeds)
    a, b, c = nodes(m, "MatMul")
    assert dq_feeding(a, 1) is dq_feeding(b, 1) is not None and dq_feeding(c, 1) is not dq_feeding(a, 1)
    int8 = [v for v in m.graph.initializers.values() if v.const_value.numpy().dtype == np.int8 and v.uses()
            and v.uses()[0].idx == 0]
    assert len(int8) == 2 and result.stats.counts["weights_quantized"] == 3
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(m, feeds[0])[0]) > 0.995


def test_relu_with_a_second_reader_of_its_input_is_not_folded():
    proto = _conv_net("r = Relu(x)\nm = Add(r, x)", 8)
    m, result, _ = run_qdq(proto, feeds_for(proto))
    assert result.stats.counts.get("relus_folded", 0) == 0 and len(nodes(m, "Relu")) == 1


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_axis_follows_transB_alpha_beta_folded(trans_b, tmp_path):
    w1 = weights(16, 12) if not trans_b else weights(12, 16)
    proto = model(f"""g (float[2,16] inp) => (float[2,5] out) {{
        h = Gemm <transB={trans_b}, beta=0.5, alpha=2.0> (inp, W1, B1)
        r = Relu(h)
        out = Gemm (r, W2, B2)
    }}""", {"W1": w1, "B1": weights(12), "W2": weights(12, 5), "B2": weights(5)})
    feeds = feeds_for(proto)
    m, _, _ = run_qdq(proto, feeds)
    gemm = nodes(m, "Gemm")[0]
    wdq = dq_feeding(gemm, 1)
    assert wdq.attributes["axis"].as_int() == (0 if trans_b else 1) and const(wdq.inputs[1]).shape == (12,)
    assert gemm.attributes["beta"].as_float() == 1.0 and const(dq_feeding(gemm, 2).inputs[0]).dtype == np.int32
    assert gemm.attributes["alpha"].as_float() == 1.0  # folded into the weight, so that QGemm fuses
    assert not nodes(m, "Relu")
    last = nodes(m, "Gemm")[1]
    assert last.outputs[0].name == "out" and all(u.node.op_type != "QuantizeLinear" for u in last.outputs[0].uses())
    path = model_io.save(m, tmp_path / "q.onnx")
    report = fusion_report(path)
    assert report and report.ops.get("com.microsoft.QGemm") == 2, report.ops
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(path, feeds[0])[0]) > 0.995


def test_matmul_const_b_per_column_and_activation_matmul(tmp_path):
    proto = model("""g (float[2,3,16] inp) => (float[2,3,8] out) {
        h = MatMul(inp, W1)
        t = Transpose <perm=[0,2,1]> (h)
        s = MatMul(h, t)
        out = MatMul(s, W2)
    }""", {"W1": weights(16, 8), "W2": weights(3, 8)})
    feeds = feeds_for(proto)
    m, _, _ = run_qdq(proto, feeds)
    mm = nodes(m, "MatMul")
    assert dq_feeding(mm[0], 1).attributes["axis"].as_int() == 1
    assert dq_feeding(mm[1], 0) is not None and dq_feeding(mm[1], 1) is not None  # two activations
    path = model_io.save(m, tmp_path / "q.onnx")
    report = fusion_report(path)
    assert report, str(report)
    assert report.ops.get("QLinearMatMul", 0) + report.ops.get("com.microsoft.MatMulIntegerToFloat", 0) == 3
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(path, feeds[0])[0]) > 0.99


@pytest.mark.parametrize("mode", ["weights", "qdq"])
def test_conv_transpose_axis1_with_groups(mode, tmp_path):
    proto = model("""g (float[1,4,6,6] inp) => (float[1,6,12,12] out) {
        y = ConvTranspose <group=2, strides=[2,2], kernel_shape=[2,2]> (inp, W, B)
        out = Relu(y)
    }""", {"W": weights(4, 3, 2, 2), "B": weights(6)})
    feeds = feeds_for(proto)
    m, _, _ = run_qdq(proto, feeds, conv_transpose=mode)
    ct = nodes(m, "ConvTranspose")[0]
    wdq = dq_feeding(ct, 1)
    assert wdq.attributes["axis"].as_int() == 1 and const(wdq.inputs[1]).shape == (3,)
    if mode == "weights":
        assert dq_feeding(ct, 0) is None and dq_feeding(ct, 2) is None
    else:
        s_x, s_w = const(dq_feeding(ct, 0).inputs[1]), const(wdq.inputs[1])
        np.testing.assert_array_equal(const(dq_feeding(ct, 2).inputs[1]), np.float32(s_x) * np.tile(s_w, 2))
    path = model_io.save(m, tmp_path / "q.onnx")
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(path, feeds[0])[0]) > 0.995


def test_concat_inputs_and_output_share_one_scale():
    proto, _ = CASES["Concat"]
    m, _, table = run_qdq(proto, feeds_for(proto))
    concat = nodes(m, "Concat")[0]
    scales = {float(const(dq_feeding(concat, i).inputs[1])) for i in range(2)}
    out_q = next(u.node for u in concat.outputs[0].uses() if u.node.op_type == "QuantizeLinear")
    scales.add(float(const(out_q.inputs[1])))
    assert len(scales) == 1
    union = max(table["x"].max, table["y"].max, table["m"].max) - min(table["x"].min, table["y"].min, 0)
    assert np.isclose(scales.pop() * 255, union, rtol=1e-5)


def test_maxpool_and_reshape_keep_the_input_scale(tmp_path):
    proto = model("""g (float[1,4,8,8] inp) => (float[1,5] out) {
        x = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (x)
        f = Reshape(p, shape)
        out = Gemm <transB=1> (f, W2, B2)
    }""", {**CONV_INITS, "shape": np.array([1, 128], np.int64), "W2": weights(5, 128), "B2": weights(5)})
    feeds = feeds_for(proto)
    m, _, _ = run_qdq(proto, feeds)
    mp, rs = nodes(m, "MaxPool")[0], nodes(m, "Reshape")[0]
    s_in = const(dq_feeding(mp, 0).inputs[1])
    s_mid = const(dq_feeding(rs, 0).inputs[1])
    s_out = const(dq_feeding(nodes(m, "Gemm")[0], 0).inputs[1])
    assert s_in == s_mid == s_out
    path = model_io.save(m, tmp_path / "q.onnx")
    report = fusion_report(path)
    assert report and "DequantizeLinear" not in report.ops, report.ops


def test_float_only_ops_get_no_qdq_and_the_pass_does_not_fire(caplog):
    proto = model("""g (float[2,16] inp) => (float[2,16] out) {
        s = Softmax <axis=1> (inp)
        out = HardSwish(s)
    }""")
    m, result, _ = run_qdq(proto, feeds_for(proto))
    assert not result.modified and not nodes(m, "QuantizeLinear")
    assert "nothing was quantized" in caplog.text


def test_hardswish_neighbours_stay_float_when_qdq_would_only_add_cost():
    proto = model("""g (float[1,4,8,8] inp) => (float[1,8,8,8] out) {
        x = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        h = HardSwish(x)
        p = MaxPool <kernel_shape=[3,3], pads=[1,1,1,1]> (h)
        out = HardSwish(p)
    }""", CONV_INITS)
    m, _, _ = run_qdq(proto, feeds_for(proto))
    assert dq_feeding(nodes(m, "MaxPool")[0], 0) is None  # MaxPool between two float ops: float
    assert dq_feeding(nodes(m, "Conv")[0], 0) is not None


# ---------------------------------------------------------------- exclusions, masks, refusals


def _three_convs():
    return model("""g (float[1,4,8,8] inp) => (float[1,4,8,8] out) {
        a = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        b = Conv <pads=[1,1,1,1]> (a, W2, B2)
        out = Conv <pads=[1,1,1,1]> (b, W3, B3)
    }""", {"W1": weights(4, 4, 3, 3), "B1": weights(4), "W2": weights(4, 4, 3, 3), "B2": weights(4),
           "W3": weights(4, 4, 3, 3), "B3": weights(4)})


@pytest.mark.parametrize("options,float_convs", [
    ({"exclude_ops": ("Conv",)}, [0, 1, 2]),
    ({"exclude": ("conv_1",)}, [1]),
    ({"exclude": ("re:^conv_[02]$",)}, [0, 2]),
    ({"keep_first": 1}, [0]),
    ({"keep_last": 2}, [1, 2]),
])
def test_exclusions(options, float_convs):
    proto = _three_convs()
    for i, n in enumerate(proto.graph.node):
        n.name = f"conv_{i}"
    m, result, _ = run_qdq(proto, feeds_for(proto), **options)
    convs = nodes(m, "Conv")
    quantized = [i for i, c in enumerate(convs) if dq_feeding(c, 1) is not None]
    assert quantized == [i for i in range(3) if i not in float_convs]
    assert {s.node for s in result.stats.skipped} >= {f"conv_{i}" for i in float_convs}


def test_plan_options_are_validated():
    with pytest.raises(ConfigError):
        PlanOptions(activations="int4")
    with pytest.raises(ConfigError):
        PlanOptions(exclude_ops=("Softmax",))
    with pytest.raises(ConfigError):
        PlanOptions(exclude=("re:(",))


def test_constant_mask_add_stays_float_and_calibrated_mask_is_kept_out():
    proto = model("""g (float[1,8,16] inp, float[1,8,16] mask) => (float[1,8,16] out, float[1,8,16] o2) {
        s = MatMul(inp, W)
        big = Mul(mask, minus)
        a = Add(s, big)
        c = Add(s, neg)
        p = Softmax <axis=2> (a)
        q = Add(p, c)
        out = MatMul(q, W2)
        o2 = MatMul(a, W3)
    }""", {"W": weights(16, 16), "W2": weights(16, 16), "W3": weights(16, 16),
           "minus": np.array(-1e9, np.float32), "neg": np.full((16,), -1e9, np.float32)})
    for i, n in enumerate(proto.graph.node):
        n.name = n.output[0]
    feeds = [{"inp": f["inp"], "mask": (f["mask"] > 0).astype(np.float32)} for f in feeds_for(proto)]
    m, result, table = run_qdq(proto, feeds)
    skipped = {s.node: s.reason for s in result.stats.skipped}
    for v in m.graph.all_nodes():
        if v.op_type == "QuantizeLinear":
            assert abs(float(const(v.inputs[1]))) * 255 < 1e3, f"{v.name} has a mask-sized range"
    assert "mask-like constant" in skipped["big"] and "mask-like constant" in skipped["c"], skipped
    a = next(n for n in m.graph if n.name == "a")
    assert dq_feeding(a, 0) is None and dq_feeding(a, 1) is None
    assert table["a"].outliers > 0 and "mask-like values" in skipped["o2"], skipped
    assert dq_feeding(nodes(m, "MatMul")[0], 1) is not None  # the MatMul before the mask is quantized


def test_pass_refusals():
    proto = _three_convs()
    with pytest.raises(ConfigError):
        QDQPass()(prepare(proto))
    old = model("""g (float[1,4,8,8] inp) => (float[1,4,8,8] out) {
        out = Conv <pads=[1,1,1,1]> (inp, W1, B1)
    }""", {"W1": weights(4, 4, 3, 3), "B1": weights(4)}, opset=11)
    m = prepare(old)
    with pytest.raises(UnsupportedModelError):
        QDQPass(plan=plan_qdq(m), table={"inp": R(-1, 1), "out": R(-1, 1)})(m)


def test_tensor_missing_from_the_table_keeps_its_nodes_float():
    proto = _three_convs()
    m = prepare(proto)
    table = {"inp": R(-2, 2), "a": R(-1, 1), "out": R(-1, 1)}  # "b" never observed
    result = QDQPass(plan=plan_qdq(m), table=table)(m)
    convs = nodes(m, "Conv")
    assert dq_feeding(convs[0], 1) is not None
    assert dq_feeding(convs[1], 1) is None and dq_feeding(convs[2], 1) is None
    assert any("no usable calibrated range" in s.reason for s in result.stats.skipped)


def test_int8_activations_and_graph_output_interface(tmp_path):
    proto = _conv_net("m = Relu(x)", 8)
    feeds = feeds_for(proto)
    m, result, _ = run_qdq(proto, feeds, activations="int8")
    zps = [const(n.inputs[2]) for n in nodes(m, "QuantizeLinear")]
    assert zps and all(z.dtype == np.int8 for z in zps)
    assert result.stats.counts["relus_folded"] == 1  # zero point -128 keeps the Relu exact
    out = m.graph.outputs[0]
    assert out.name == "out" and out.dtype.name == "FLOAT" and list(out.shape) == [1, 6, 8, 8]
    assert out.producer().op_type == "DequantizeLinear"
    for n in m.graph.all_nodes():
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            s = const(n.inputs[1])
            assert np.all(np.isfinite(s)) and np.all(s > 0)
    path = model_io.save(m, tmp_path / "q.onnx")
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(path, feeds[0])[0]) > 0.995


def test_hard_swish_chain_with_div_runs_int8(tmp_path):
    proto = _conv_net("a = Add(x, three)\nc = Clip(a, zero, six)\nh = Mul(x, c)\nm = Div(h, six)", 8,
                      {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32),
                       "six": np.array(6.0, np.float32)})
    feeds = feeds_for(proto)
    m, result, _ = run_qdq(proto, feeds)
    assert not nodes(m, "Div") and result.stats.counts["divisions_to_multiplications"] == 1
    assert result.stats.counts["relus_folded"] == 1  # the Clip
    recip = next(n for n in nodes(m, "Mul") if dq_feeding(n, 1).inputs[0].producer() is None)
    dq = dq_feeding(recip, 1)
    assert np.isclose((float(const(dq.inputs[0])) - float(const(dq.inputs[2]))) * const(dq.inputs[1]), 1 / 6,
                      atol=float(const(dq.inputs[1])))
    path = model_io.save(m, tmp_path / "q.onnx")
    report = fusion_report(path)
    assert report and not any(op in report.ops for op in ("Add", "Mul", "Div", "Clip")), report.ops
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(path, feeds[0])[0]) > 0.99


def test_speed_knobs_keep_depthwise_and_small_convs_float():
    proto = model("""g (float[1,8,8,8] inp) => (float[1,16,8,8] out) {
        d = Conv <group=8, pads=[1,1,1,1]> (inp, Wd, Bd)
        out = Conv (d, Wp, Bp)
    }""", {"Wd": weights(8, 1, 3, 3), "Bd": weights(8), "Wp": weights(16, 8, 1, 1), "Bp": weights(16)})
    feeds = feeds_for(proto)
    for opts, quantized in [({}, [True, True]), ({"depthwise": False}, [False, True]),
                            ({"min_conv_macs": 9}, [True, False]), ({"min_conv_macs": 10}, [False, False])]:
        m, _, _ = run_qdq(proto, feeds, **opts)
        assert [dq_feeding(c, 1) is not None for c in nodes(m, "Conv")] == quantized, opts


def _hardswish_depthwise_model():
    """Conv -> written-out hard-swish -> depthwise Conv -> Conv. Channel 0 is large and positive (up to
    ~35); channels 1-7 sit in [-3, 0], where hard-swish maps them into [-0.375, 0], and their depthwise
    weights are large (as BatchNorm folding leaves them for such low-variance channels)."""
    w1 = weights(8, 8, 1, 1, seed=3, scale=0.5 / np.sqrt(8))
    w1[0] *= 10
    b1 = np.full(8, -1.5, np.float32)
    b1[0] = 20.0
    wd = weights(8, 1, 3, 3, seed=4) * np.array([1] + [30] * 7, np.float32)[:, None, None, None]
    return model("""g (float[1,8,8,8] inp) => (float[1,16,8,8] out) {
        c = Conv (inp, W1, B1)
        a = Add (c, three)
        r = Clip (a, zero, six)
        m = Mul (c, r)
        h = Div (m, six)
        d = Conv <group=8, pads=[1,1,1,1]> (h, Wd, Bd)
        out = Conv (d, Wp, Bp)
    }""", {"W1": w1, "B1": b1, "three": np.float32(3), "zero": np.float32(0),
           "six": np.float32(6), "Wd": wd, "Bd": weights(8, seed=6), "Wp": weights(16, 8, 1, 1, seed=7),
           "Bp": weights(16, seed=8)})


def test_depthwise_inputs_knob_keeps_the_chain_into_a_float_depthwise_conv_float():
    proto = _hardswish_depthwise_model()
    feeds = feeds_for(proto)
    ref = ort_run(proto, feeds[0])[0]
    got = {}
    for key, opts in [("default", {}), ("dw", {"depthwise": False}),
                      ("dw_in", {"depthwise": False, "depthwise_inputs": False}),
                      ("in_only", {"depthwise_inputs": False})]:  # must not fire while depthwise convs quantize
        m, result, _ = run_qdq(proto, feeds, **opts)
        first, dw, last = nodes(m, "Conv")
        got[key] = (dq_feeding(dw, 0) is not None, len(nodes(m, "DequantizeLinear")), result)
        assert dq_feeding(first, 1) is not None and dq_feeding(last, 1) is not None, key  # compute stays int8
        got[key] += (cosine(ref, ort_run(m, feeds[0])[0]),)
    assert got["default"][0] and not got["dw_in"][0] and got["dw_in"][1] < got["dw"][1]  # fewer Q/DQ pairs
    assert got["in_only"][:2] == got["default"][:2]
    assert any("depthwise_inputs=False" in s.reason for s in got["dw_in"][2].stats.skipped)
    # hard-swish output rounded on channel 0's scale, then multiplied by large weights: drift 6e-3 -> 5e-4
    drift = {k: 1 - v[3] for k, v in got.items()}
    assert drift["dw_in"] < drift["dw"] / 5 and drift["dw_in"] < drift["default"] / 5, drift


def test_matmul_of_two_activations_knob():
    proto = model("""g (float[2,3,16] inp) => (float[2,3,3] out) {
        h = MatMul(inp, W1)
        t = Transpose <perm=[0,2,1]> (h)
        out = MatMul(h, t)
    }""", {"W1": weights(16, 8)})
    m, result, _ = run_qdq(proto, feeds_for(proto), matmul_activations=False)
    mm = nodes(m, "MatMul")
    assert dq_feeding(mm[0], 1) is not None and dq_feeding(mm[1], 0) is None
    assert any("two activations" in s.reason for s in result.stats.skipped)


def _head(box_scale: float) -> onnx.ModelProto:
    """A detector head: boxes (a conv scaled to pixels) and scores (a sigmoid) concatenated into the graph
    output, as YOLOv8 exports it."""
    return model("""g (float[1,8,4,4] x) => (float[1,8,4,4] y) {
        a = Conv(x, Wa)
        boxes = Mul(a, s)
        b = Conv(x, Wb)
        scores = Sigmoid(b)
        y = Concat <axis=1> (boxes, scores)
    }""", {"Wa": weights(4, 8, 1, 1), "Wb": weights(4, 8, 1, 1), "s": np.array(box_scale, np.float32)})


@pytest.mark.parametrize("box_scale, floated", [(300.0, True), (2.0, False)])
def test_concat_of_mismatched_ranges_stays_float(box_scale, floated):
    proto = _head(box_scale)
    for n in proto.graph.node:
        n.name = n.output[0]
    feeds = feeds_for(proto)
    m, _, _ = run_qdq(proto, feeds)
    cat = nodes(m, "Concat")[0]
    dq = dq_feeding(cat, 1)  # the scores' DequantizeLinear, if any
    if floated:  # the scores keep their own scale (1/255 of [0, 1]) or stay float, not the boxes' span
        assert dq is None or float(const(dq.inputs[1])) < 0.01
        ref = ort_run(proto, feeds[0])[0][:, 4:]
        got = ort_run(m, feeds[0])[0][:, 4:]
        assert cosine(ref, got) > 0.999
    else:  # similar ranges: one shared scale, the Concat runs quantized
        assert dq_feeding(nodes(m, "Concat")[0], 0) is not None
        assert any(q.op_type == "QuantizeLinear" and q.inputs[0] is cat.outputs[0] for q in m.graph)


def test_weight_memo_reuses_codes_only_for_the_models_tensors_and_the_same_scale():
    """``WeightMemo``: parameters computed once per key; codes reused (read-only) when the final scale
    is the one they were made with, computed anew otherwise (a scale raised for an int32 bias); a
    tensor that is not one of the model's initializers is never remembered."""
    from onnxshrink.passes._weight_memo import WeightMemo

    proto = model("""g (float[2,16] inp) => (float[2,8] out) { out = MatMul(inp, W) }""",
                  {"W": weights(16, 8, seed=5)})
    m = prepare(proto)
    memo = WeightMemo(m)
    w = m.graph.initializers["W"]
    key = memo.key(w, "MatMul", 1, False, False, False, 1.0)
    assert key is not None and memo.key(ir.Value(name="other", const_value=ir.Tensor(np.ones(2))), "x") is None
    calls = []

    def params():
        calls.append("params")
        return qm.weight_params(w.const_value.numpy(), 1)

    p = memo.params(key, params)
    assert memo.params(key, params) is p and calls == ["params"]

    def codes(scale):
        def make():
            calls.append("codes")
            return qm.quantize_weight(w.const_value.numpy(), qm.QParams(scale, p.zero_point, 1))
        return make

    first = memo.codes(key, p.scale, codes(p.scale))
    assert memo.codes(key, p.scale.copy(), codes(p.scale)) is first and memo.hits == 1
    assert not first.flags.writeable
    raised = p.scale * 2
    other = memo.codes(key, raised, codes(raised))
    assert other is not first and calls.count("codes") == 2 and memo.hits == 1
    assert memo.codes(key, p.scale, codes(p.scale)) is first  # the first stays remembered
    assert memo.codes(None, p.scale, codes(p.scale)) is not first and calls.count("codes") == 3
