"""Dynamic int8 quantization of MatMul/Gemm (``dynamic_quantize``), ORT's fusion of it, and the region
placements the tuner tries for transformer-like models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxshrink.passes._qdq_math import neighbour_sums
from onnxshrink.passes.dynamic_quant import DynamicQuantPass, weight_scales

import onnxshrink
from models import zoo
from onnxshrink import checks, model_io, ort_int8, qdq_tune
from onnxshrink.qdq_fusion import fusion_report
from tests.conftest import run_ort
from tests.qdq_helpers import cosine, feeds_for, model, nodes, weights


def _linear_model() -> onnx.ModelProto:
    return model("""g (float[2,5,16] inp) => (float[2,5,8] out, float[10,6] g) {
        h = MatMul(inp, W)
        hb = Add(b, h)
        r = Relu(hb)
        out = MatMul(r, W2)
        f = Flatten <axis=2> (inp)
        g = Gemm <transB=1, alpha=0.5, beta=2.0> (f, G, C)
    }""", {"W": weights(16, 12), "b": weights(12), "W2": weights(12, 8), "G": weights(6, 16), "C": weights(6)})


def _dynamic(proto, **cfg):
    m = model_io.load(proto)
    result = DynamicQuantPass(**cfg)(m)
    assert checks.check_structure(m)
    return m, result.stats


def test_structure_numerics_and_names():
    proto = _linear_model()  # 7-bit weights where this CPU's int8 kernels saturate 8-bit ones (quantize's auto)
    m, stats = _dynamic(proto, reduce_range="MatMulInteger" in ort_int8.saturating_ops())
    assert stats.counts["linear_layers_dynamic"] == 3
    assert not nodes(m, "MatMul") and not nodes(m, "Gemm")
    assert len(nodes(m, "DynamicQuantizeLinear")) == 3 and len(nodes(m, "MatMulInteger")) == 3
    mmi = nodes(m, "MatMulInteger")[0]
    wq, wzp = mmi.inputs[1].const_value.numpy(), mmi.inputs[3].const_value.numpy()
    assert wq.dtype == np.int8 and wq.shape == (16, 12) and wzp.shape == (12,) and not wzp.any()
    assert [o.name for o in m.graph.outputs] == ["out", "g"]
    add = next(n for n in m.graph if n.op_type == "Add" and n.outputs[0].name == "hb")
    assert add.inputs[1].const_value is not None  # the bias moved second (ORT fuses it then)
    for feed in feeds_for(proto, n=3, seed=4):
        got, ref = run_ort(m, feed), run_ort(proto, feed)
        for k in ref:
            assert cosine(got[k], ref[k]) > 0.999, k


def test_weight_scales_per_column_and_per_tensor():
    w = weights(16, 4) * np.array([1, 10, 100, 0], np.float32)
    wq, s = weight_scales(w, per_channel=True, reduce_range=False)
    np.testing.assert_allclose(s[:3], np.abs(w[:, :3]).max(axis=0) / 127, rtol=1e-6)
    assert s[3] == 1.0 and not wq[:, 3].any() and np.abs(wq).max() == 127
    np.testing.assert_allclose(wq * s, w, atol=s.max() / 2 + 1e-7)
    wq1, s1 = weight_scales(w, per_channel=False, reduce_range=True)
    pairs = neighbour_sums(wq1, 0)
    assert s1.shape == () and pairs.max() <= 128 and np.abs(wq1).max() > 64
    wq7, _ = weight_scales(w, per_channel=False, reduce_range=True, narrow="7bit")
    assert np.abs(wq7).max() == 64
    with pytest.raises(onnxshrink.errors.ConfigError, match="narrow"):
        DynamicQuantPass(narrow="6bit")


def test_pair_safe_scales_keep_more_bits_than_seven_and_never_clip():
    """``pair_safe_scale``: neighbours along K never sum past 128 after rounding, the step is finer than
    7 bits' (absmax / 64) on these heavy-tailed columns (at worst, two largest weights side by side, it
    is 2 absmax / 127), and a column whose large weights sit apart keeps 8 bits."""
    from onnxshrink.passes._qdq_math import pair_safe_scale

    rng = np.random.default_rng(3)
    w = (rng.standard_t(2, (256, 64)) * rng.uniform(0.01, 1, 64)).astype(np.float32)
    s = pair_safe_scale(w, 0, 0)
    q = np.clip(np.rint(w / s), -127, 127).astype(np.int32)
    assert neighbour_sums(q, 0).max() <= 128
    assert np.all(s <= np.abs(w).max(axis=0) / 64 * (1 + 1e-6))
    apart = np.zeros((8, 1), np.float32)
    apart[[0, 4]] = [[1.0], [-0.5]]  # large weights with small neighbours: the full 8 bits
    assert pair_safe_scale(apart, 0, 0)[0] == np.float32(1 / 127)


@pytest.mark.parametrize("safe", [True, False])
def test_pair_safe_weights_are_exact_in_onnxruntimes_int8_gemm(safe):
    """MatMulInteger with the largest uint8 input (255) and weights whose neighbours sum to 128
    (pair-safe) equals the exact integer product on this CPU; neighbours summing to 254 (8-bit
    weights at full scale) clip where ``ort_int8`` reports the GEMM saturating."""
    k, n = 64, 16
    wq = np.zeros((k, n), np.int8)
    wq[0::2], wq[1::2] = (64, 64) if safe else (127, 127)
    proto = model("""g (uint8[4,64] a) => (int32[4,16] y) { y = MatMulInteger(a, W) }""", {"W": wq})
    a = np.full((4, k), 255, np.uint8)
    got = run_ort(proto, {"a": a})["y"]
    exact = a.astype(np.int64) @ wq.astype(np.int64)
    if safe or "MatMulInteger" not in ort_int8.saturating_ops():
        np.testing.assert_array_equal(got, exact)
    else:
        assert np.abs(got - exact).max() > 0


def test_ort_fuses_the_standard_pattern(tmp_path):
    m, _ = _dynamic(_linear_model())
    path = model_io.save(m, tmp_path / "d.onnx")
    report = fusion_report(path)
    fused = report.ops.get("com.microsoft.DynamicQuantizeMatMul", 0) + report.ops.get(
        "com.microsoft.MatMulIntegerToFloat", 0)
    assert fused == 3 and "MatMulInteger" not in report.ops and "Cast" not in report.ops, report.ops


def test_refusals_and_exclusions():
    proto = model("""g (float[2,16] inp, float[16,4] wd) => (float[2,4] a, float[2,4] b, float[2,4] c) {
        a = MatMul(inp, wd)
        b = MatMul(inp, W)
        c = Gemm <transA=1> (T, W)
    }""", {"W": weights(16, 4), "T": weights(16, 2)})
    _m, stats = _dynamic(proto, exclude=("re:^keep",))
    assert "linear_layers_dynamic" in stats.counts and stats.counts["linear_layers_dynamic"] == 1
    reasons = " ".join(s.reason for s in stats.skipped)
    assert "not a constant" in reasons and ("transA" in reasons or "first operand is constant" in reasons)
    proto.graph.node[1].name = "keep_me"
    _, stats = _dynamic(proto, exclude=("re:^keep",))
    assert "linear_layers_dynamic" not in stats.counts and any("exclude" in s.reason for s in stats.skipped)


def test_quantize_dynamic_mode_needs_no_data(tmp_path):
    proto = _linear_model()
    res = onnxshrink.quantize(proto, None, tmp_path / "q.onnx", mode="dynamic", cache_dir=False)
    assert res.table is None and res.placement == qdq_tune.Placement("dynamic", "float")
    assert sorted(res.dynamic_nodes) == sorted(n.name for n in res.model.graph if n.name in res.dynamic_nodes)
    assert len(res.dynamic_nodes) == 3 and res.quantized_nodes == 3
    assert res.after["initializer_bytes"] < 0.4 * res.before["initializer_bytes"]
    with pytest.raises(onnxshrink.errors.ConfigError):
        onnxshrink.quantize(proto, None, mode="fast")


def test_tuner_tries_region_placements_on_a_transformer(tmp_path):
    proto = zoo.build("transformer")
    feeds = feeds_for(proto, n=4, batch=2)
    res = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune_runs=3)
    tried = {(r["linear"], r["rest"]) for r in res.tuning.tried}
    assert {("dynamic", "static"), ("dynamic", "float"), ("float", "static")} <= tried
    assert res.tuning.chosen["linear"] == res.placement.linear and res.tuning.speedup > 0
    assert ("float", "float") not in tried  # one region always stays int8
    got, ref = run_ort(res.output, feeds[0])["output"], run_ort(proto, feeds[0])["output"]
    assert cosine(got, ref) > 0.99
    assert fusion_report(res.output)
    static = onnxshrink.quantize(proto, feeds, None, mode="static", cache_dir=False, tune_runs=3)
    assert static.placement == qdq_tune.Placement() and not static.dynamic_nodes
    assert qdq_tune.transformer_like(model_io.load(proto))
    assert not qdq_tune.transformer_like(model_io.load(zoo.build("resnet")))


def test_cli_dynamic_with_a_custom_op_is_written_and_says_fusion_was_not_checked(tmp_path, capsys):
    """ONNX Runtime has no kernel for my.ops.Foo here, and dynamic mode needs no session: the model is
    written (valid ONNX for a runtime that registers the op), and the fusion report says it was not run."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxshrink.cli import main

    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Foo", ["m"], ["y"], domain="my.ops")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])], [numpy_helper.from_array(weights(16, 12), "W")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
    src, out = tmp_path / "custom.onnx", tmp_path / "custom.dyn.onnx"
    onnx.save(proto, src)
    assert main(["optimize", str(src), "-o", str(out), "--quantize", "dynamic"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "ONNX Runtime CPU fusion: not checked" in text and "my.ops:Foo" in text
    assert "quantized 1 nodes: dynamic linear layers 1" in text
    assert [n.op_type for n in onnx.load(out).graph.node if n.op_type in ("MatMulInteger", "Foo")] == \
        ["MatMulInteger", "Foo"]
