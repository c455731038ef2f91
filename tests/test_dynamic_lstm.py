"""``dynamic_quantize`` on LSTMs: ``com.microsoft.DynamicQuantizeLSTM`` with int8 weights, its refusals,
LSTM MACs, and the real recognizer (ddddocr) it was written for."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxshrink.passes._qdq_math import neighbour_sums
from onnxshrink.passes.dynamic_quant import DynamicQuantPass

import onnxshrink
from onnxshrink import checks, model_io, ort_int8, stats
from tests.conftest import fetch_or_skip, run_ort
from tests.qdq_helpers import cosine, nodes

T, B, I, H = 7, 2, 24, 16
NARROW = "MatMulInteger" in ort_int8.saturating_ops()  # the kernel's GEMM is the same u8 x s8 one


def _lstm(direction: str = "bidirectional", layout: int | None = None, outputs=("y", "y_h", "y_c")):
    d = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((d, 4 * H, I)) * 0.3).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((d, 4 * H, H)) * 0.3).astype(np.float32), "R"),
             numpy_helper.from_array((rng.standard_normal((d, 8 * H)) * 0.1).astype(np.float32), "B")]
    attrs = {"hidden_size": H, "direction": direction, **({"layout": layout} if layout is not None else {})}
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], list(outputs), name="lstm", **attrs)
    tail = helper.make_node("Relu", [outputs[0]], ["out"])
    x = [T, B, I] if not layout else [B, T, I]
    y = [T, d, B, H] if not layout else [B, T, d, H]
    graph = helper.make_graph([node, tail], "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, y),
                               *[helper.make_tensor_value_info(o, TensorProto.FLOAT, [d, B, H]) for o in outputs[1:]]],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(proto, n: int = 3):
    rng = np.random.default_rng(5)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_lstm_becomes_dynamic_quantize_lstm(direction, per_channel):
    proto = _lstm(direction)
    m = model_io.load(proto)
    result = DynamicQuantPass(per_channel=per_channel, reduce_range=NARROW)(m)
    assert checks.check_structure(m)
    assert result.stats.counts["lstm_layers_dynamic"] == 1 and not nodes(m, "LSTM")
    q = nodes(m, "DynamicQuantizeLSTM")[0]
    d = 2 if direction == "bidirectional" else 1
    assert q.domain == "com.microsoft" and q.name == "lstm" and m.opset_imports["com.microsoft"] == 1
    wq, ws = q.inputs[1].const_value.numpy(), q.inputs[8].const_value.numpy()
    assert wq.dtype == np.int8 and wq.shape == (d, I, 4 * H)  # transposed, as the kernel reads it
    assert ws.shape == ((d, 4 * H) if per_channel else (d,))
    pairs = neighbour_sums(wq, 1)  # neighbours along K
    assert np.abs(wq).max() <= 127 and (not NARROW or pairs.max() <= 128)
    assert [o.name for o in q.outputs] == ["y", "y_h", "y_c"]
    for feed in _feeds(proto):
        got, ref = run_ort(m, feed), run_ort(proto, feed)
        for k in ref:
            assert cosine(got[k], ref[k]) > 0.999, k


def test_lstm_refusals_and_switch():
    m = model_io.load(_lstm(layout=1))
    result = DynamicQuantPass()(m)
    assert nodes(m, "LSTM") and any("layout=1" in s.reason for s in result.stats.skipped)
    m = model_io.load(_lstm())
    DynamicQuantPass(lstm=False)(m)
    assert nodes(m, "LSTM") and not nodes(m, "DynamicQuantizeLSTM")
    m = model_io.load(_lstm())
    DynamicQuantPass(exclude=("lstm",))(m)
    assert nodes(m, "LSTM")


def test_lstm_macs():
    m = model_io.load(_lstm("bidirectional"))
    assert stats.macs(m) == 2 * T * B * 4 * H * (I + H)
    DynamicQuantPass()(m)
    assert stats.macs(m) == 2 * T * B * 4 * H * (I + H)  # the int8 LSTM counts the same


@pytest.mark.realmodel
def test_ddddocr_recognizer_lstm_runs_int8(tmp_path):
    """ddddocr's recognizer (a bidirectional LSTM of 512 over a conv front end): ``--quantize dynamic``
    turns its LSTM int8 and keeps every character step's arg-max on the evaluation lines. Where the
    probe finds the u8 x s8 GEMM saturating 8-bit weights, pair-safe LSTM weights are the more accurate."""
    from models import fetch_real

    src = str(fetch_or_skip("ddddocr_ocr"))
    evals = fetch_real.example_feeds("ddddocr_ocr", n=6, seed=1)
    result = onnxshrink.quantize(src, None, tmp_path / "q.onnx", mode="dynamic")
    assert "LSTM_79" in result.dynamic_nodes
    assert [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node].count("DynamicQuantizeLSTM") == 1
    errors = {}
    for narrow in (False, True):
        m = model_io.load(src)
        DynamicQuantPass(reduce_range=narrow)(m)
        errors[narrow] = max(float(np.abs(run_ort(m, f)[k] - v).max() / np.abs(v).max())
                             for f in evals for k, v in run_ort(src, f).items())
    for f in evals:
        ref, got = run_ort(src, f), run_ort(str(tmp_path / "q.onnx"), f)
        for k in ref:
            assert np.mean(ref[k].argmax(-1) == got[k].argmax(-1)) >= 0.95, k
    if NARROW:
        assert errors[True] < errors[False], errors


@pytest.mark.realmodel
def test_wake_word_lstms_get_pair_safe_weights_where_int8_saturates(tmp_path):
    """openWakeWord's hey_mycroft (two tf2onnx LSTMs and a Gemm), ``--quantize dynamic``: where the
    u8 x s8 GEMM saturates, pair-safe weights drift less than 7-bit ones on held-out embeddings
    (``benchmarks/results/dynamic_weights_avx2.md``: 0.00023 vs 0.0039)."""
    from models import fetch_real
    from onnxshrink import validate

    src = str(fetch_or_skip("oww_hey_mycroft"))
    evals = fetch_real.example_feeds("oww_hey_mycroft", 32, seed=1)
    result = onnxshrink.quantize(src, None, tmp_path / "q.onnx", mode="dynamic")
    assert len(result.dynamic_nodes) == 3
    drift = 1 - validate.compare(src, tmp_path / "q.onnx", evals).overall["cosine"]
    seven = model_io.load(src)
    DynamicQuantPass(reduce_range=True, narrow="7bit")(seven)
    drift7 = 1 - validate.compare(src, seven, evals).overall["cosine"]
    assert drift < (0.5 * drift7 if NARROW else 0.01), (drift, drift7)


def test_exclude_op_lstm_keeps_standard_onnx(tmp_path):
    """``exclude_ops=("LSTM",)`` (``--exclude-op LSTM``) leaves LSTMs float: only standard ops are written."""
    proto = _lstm()
    onnx.save(proto, tmp_path / "lstm.onnx")
    onnxshrink.quantize(tmp_path / "lstm.onnx", None, tmp_path / "q.onnx", mode="dynamic", exclude_ops=("LSTM",))
    ops = [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node]
    assert "LSTM" in ops and "DynamicQuantizeLSTM" not in ops
    onnxshrink.quantize(tmp_path / "lstm.onnx", None, tmp_path / "q2.onnx", mode="dynamic")
    assert "DynamicQuantizeLSTM" in [n.op_type for n in onnx.load(tmp_path / "q2.onnx").graph.node]


def test_drift_budget_ranks_an_int8_lstm_by_its_own_input():
    """Mixed precision re-measures a dynamic layer from its float input; an int8 LSTM is one node that
    reads it (it found none, and charged the LSTM with every upstream layer's noise)."""
    from onnxshrink.mixed_precision import _dynamic_input

    m = model_io.load(_lstm())
    DynamicQuantPass()(m)
    q = nodes(m, "DynamicQuantizeLSTM")[0]
    assert _dynamic_input(q) is q.inputs[0] and q.inputs[0].name == "x"
