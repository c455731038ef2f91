"""Accuracy recovery around int8: cross-layer equalization, SmoothQuant, bias correction, drift-budgeted
mixed precision, and their CLI flags."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ShapeInferencePass
from onnxshrink.passes.equalize import CrossLayerEqualizationPass
from onnxshrink.passes.smoothquant import SmoothQuantPass, candidates

import onnxshrink
from onnxshrink import channel_stats, checks, cli, model_io, runtime, validate
from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import const_array
from tests.conftest import check_close, run_ort
from tests.qdq_helpers import cosine, feeds_for, fragile_chain, model, weights


def _imbalanced_convs(act: str | None = "Relu(x)", extra: str = "", clip_in: bool = False) -> onnx.ModelProto:
    """Conv -> act -> Conv whose first conv's output channels differ in range by up to 100x (no act: the
    second conv reads the first directly)."""
    w1 = weights(8, 4, 3, 3, seed=1) * np.logspace(-1, 1, 8, dtype=np.float32)[:, None, None, None]
    head = "xc = Clip(inp, zero, six)\n        x = Conv <pads=[1,1,1,1]> (xc, W1, B1)" if clip_in else \
        "x = Conv <pads=[1,1,1,1]> (inp, W1, B1)"
    return model(f"""g (float[1,4,8,8] inp) => (float[1,6,8,8] out) {{
        {head}
        a = {act or "Identity(x)"}
        out = Conv <pads=[1,1,1,1]> ({"a" if act else "x"}, W2, B2)
        {extra}
    }}""", {"W1": w1, "B1": weights(8, seed=2), "W2": weights(6, 8, 3, 3, seed=3), "B2": weights(6, seed=4),
            "zero": np.array(0, np.float32), "six": np.array(6, np.float32)})


def _equalize(proto):
    m = model_io.load(proto)
    result = CrossLayerEqualizationPass()(m)
    assert checks.check_structure(m)
    return m, result.stats


def _range_ratio(w: np.ndarray) -> float:
    r = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return float(r.max() / r.min())


@pytest.mark.parametrize("act", ["Relu(x)", "LeakyRelu <alpha=0.1> (x)", None])
def test_cle_is_exact_and_balances_channel_ranges(act):
    proto = _imbalanced_convs(act)
    if act is None:  # drop the unused Identity so the conv output has one reader
        del proto.graph.node[1]
    m, stats = _equalize(proto)
    assert stats.counts["pairs_equalized"] == 1
    feed = feeds_for(proto, n=1)[0]
    check_close(run_ort(m, feed), run_ort(proto, feed))
    conv1 = next(n for n in m.graph if n.op_type == "Conv")
    before = _range_ratio(onnx.numpy_helper.to_array(proto.graph.initializer[0]))
    assert _range_ratio(const_array(conv1.inputs[1])) < before / 5


def test_cle_renames_the_rescaled_tensors_so_explain_maps_only_like_with_like():
    from onnxshrink import explain

    proto = _imbalanced_convs()
    m, _ = _equalize(proto)
    conv1, relu = (next(n for n in m.graph if n.op_type == op) for op in ("Conv", "Relu"))
    assert conv1.outputs[0].name.startswith("x_equalized") and relu.outputs[0].name.startswith("a_equalized")
    report = explain.explain(proto, m, feeds_for(proto, n=2), threads=1, batches=2)
    assert {"x_equalized", "a_equalized"} <= {n.split("_equalized")[0] + "_equalized" for n in report.unmatched}
    assert min(t.sqnr_db for t in report.tensors.values()) > 80  # what still maps holds the same values


def test_cle_depthwise_and_gemm_chains_are_exact():
    proto = model("""g (float[1,4,8,8] inp) => (float[1,3] out) {
        x = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        r = Relu(x)
        d = Conv <group=8, pads=[1,1,1,1]> (r, Wd, Bd)
        r2 = Relu(d)
        p = Conv (r2, Wp, Bp)
        f = Flatten(p)
        h = Gemm <transB=1> (f, G1, C1)
        hr = Relu(h)
        out = Gemm (hr, G2, C2)
    }""", {"W1": weights(8, 4, 3, 3, seed=1) * np.logspace(-1, 1, 8, dtype=np.float32)[:, None, None, None],
           "B1": weights(8), "Wd": weights(8, 1, 3, 3, seed=5), "Bd": weights(8), "Wp": weights(2, 8, 1, 1),
           "Bp": weights(2), "G1": weights(5, 128) * np.logspace(-1, 1, 5, dtype=np.float32)[:, None],
           "C1": weights(5), "G2": weights(5, 3), "C2": weights(3)})
    m, stats = _equalize(proto)
    assert stats.counts["pairs_equalized"] == 3  # conv->dw, dw->pw, gemm->gemm (Flatten between pw and Gemm)
    feed = feeds_for(proto, n=1)[0]
    check_close(run_ort(m, feed), run_ort(proto, feed))


def test_cle_refuses_non_homogeneous_activations_and_shared_tensors():
    _, stats = _equalize(_imbalanced_convs("Sigmoid(x)"))
    assert not stats.counts and any("not positively homogeneous" in s.reason for s in stats.skipped)
    _, stats = _equalize(_imbalanced_convs("Relu(x)", extra="side = Identity(x)"))
    assert not stats.counts and any("other users" in s.reason for s in stats.skipped)
    proto = model("""g (float[1,4,8,8] inp) => (float[1,6,8,8] out, float[1,8,8,8] a) {
        x = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        a = Relu(x)
        out = Conv <pads=[1,1,1,1]> (a, W2, B2)
    }""", {"W1": weights(8, 4, 3, 3), "B1": weights(8), "W2": weights(6, 8, 3, 3), "B2": weights(6)})
    _m, stats = _equalize(proto)
    assert not stats.counts and any("other users" in s.reason for s in stats.skipped)


def test_cle_clip_channels_scale_only_when_the_bound_is_proven():
    # Unbounded input: Clip(0, 6) may saturate, so every channel keeps s = 1 and nothing changes.
    m, stats = _equalize(_imbalanced_convs("Clip(x, zero, six)"))
    assert stats.counts["channels_pinned_by_clip"] == 8 and "layers_rescaled" not in stats.counts
    # Input clipped to [0, 6] and small weights: conv1 never reaches 6, so the channels are scaled.
    proto = _imbalanced_convs("Clip(x, zero, six)", clip_in=True)
    for init in proto.graph.initializer:
        if init.name == "W1":
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 0.002, "W1"))
    m, stats = _equalize(proto)
    assert stats.counts["layers_rescaled"] == 2 and stats.counts.get("channels_pinned_by_clip", 0) == 0
    feed = {"inp": np.abs(feeds_for(proto, n=1)[0]["inp"]) * 10}
    check_close(run_ort(m, feed), run_ort(proto, feed))


# ---------------------------------------------------------------- SmoothQuant


def _outlier_ln_matmul() -> onnx.ModelProto:
    gamma = np.ones(16, np.float32)
    gamma[[3, 11]] = 60.0  # two outlier channels, as in LLM activations
    return model("""g (float[2,5,16] inp) => (float[2,5,8] out, float[2,5,8] out2) {
        x = LayerNormalization <axis=-1> (inp, gamma, beta)
        out = MatMul(x, W)
        h = MatMul(x, W2)
        out2 = Add(h, b2)
    }""", {"gamma": gamma, "beta": weights(16), "W": weights(16, 8), "W2": weights(16, 8), "b2": weights(8)})


def test_smoothquant_folds_into_a_decomposed_layernorm():
    gamma = np.ones(16, np.float32)
    gamma[5] = 40.0
    proto = model("""g (float[2,5,16] inp) => (float[2,5,8] out) {
        m = Mul(inp, gamma)
        x = Add(m, beta)
        out = MatMul(x, W)
    }""", {"gamma": gamma, "beta": weights(16), "W": weights(16, 8)})
    m, stats = _smooth(proto)
    assert stats.counts == {"tensors_smoothed": 1, "layers_rescaled": 1}
    feed = feeds_for(proto, n=1)[0]
    check_close(run_ort(m, feed), run_ort(proto, feed))


def test_channel_statistics_run_without_a_memory_arena(monkeypatch):
    """Per-channel statistics (bias correction's probe, SmoothQuant's maxima) open their session without
    ONNX Runtime's CPU arena, which would hold the largest run's tensors (the probe's dequantized float
    weights) for the session's life."""
    options, make = [], runtime.make_session

    def spy(model, providers=None, **kwargs):
        options.append(kwargs["options"])
        return make(model, providers, **kwargs)

    monkeypatch.setattr(runtime, "make_session", spy)
    proto = model("""g (float[2,5,16] inp) => (float[2,5,8] out) {
        m = Mul(inp, gamma)
        x = Add(m, beta)
        out = MatMul(x, W)
    }""", {"gamma": weights(16), "beta": weights(16), "W": weights(16, 8)})
    _smooth(proto)
    assert len(options) == 1 and not options[0].enable_cpu_mem_arena


def _smooth(proto, alpha=0.5):
    m = model_io.load(proto)
    ShapeInferencePass(check_type=False, strict_mode=False)(m)
    probe = m.clone()
    xs = candidates(probe)
    maxima = channel_stats.collect(probe, feeds_for(proto, n=4), [channel_stats.ChannelTap(x, -1) for x in xs])
    result = SmoothQuantPass(alpha=alpha, act_absmax={x.name: a for x, a in zip(xs, maxima)})(m)
    assert checks.check_structure(m)
    return m, result.stats


def test_smoothquant_is_exact_in_float_and_shrinks_the_activation_range():
    proto = _outlier_ln_matmul()
    m, stats = _smooth(proto)
    assert stats.counts == {"tensors_smoothed": 1, "layers_rescaled": 2}
    feed = feeds_for(proto, n=1)[0]
    check_close(run_ort(m, feed), run_ort(proto, feed))
    x_before = run_ort(_with_output(proto, "x"), feed)["x"]
    smoothed = next(n for n in m.graph if n.op_type == "MatMul").inputs[0].name
    assert smoothed.startswith("x_smoothed")  # it holds x / s now: renamed, so explain does not map it to x
    x_after = run_ort(_with_output(ir.serde.serialize_model(m), smoothed), feed)[smoothed]
    assert np.abs(x_after).max() < np.abs(x_before).max() / 4
    assert np.abs(x_after).max(axis=(0, 1)).std() < np.abs(x_before).max(axis=(0, 1)).std() / 4


def test_smoothquant_lowers_static_int8_drift_and_skips_mixed_readers(tmp_path):
    proto = _outlier_ln_matmul()
    feeds = feeds_for(proto, n=8)
    drift = {}
    for sq in (None, 0.5):
        res = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", mode="static", tune=False, cache_dir=False,
                                  smoothquant=sq)
        drift[sq] = 1 - min(cosine(a, b) for a, b in zip(run_ort(res.model, feeds[0]).values(),
                                                        run_ort(proto, feeds[0]).values()))
    assert drift[0.5] < drift[None] / 2, drift
    mixed = model("""g (float[2,5,16] inp) => (float[2,5,8] out, float[2,5,16] y) {
        x = LayerNormalization <axis=-1> (inp, gamma, beta)
        out = MatMul(x, W)
        y = Relu(x)
    }""", {"gamma": np.ones(16, np.float32), "beta": weights(16), "W": weights(16, 8)})
    assert candidates(model_io.load(mixed)) == []


def _with_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    p.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return p


# ---------------------------------------------------------------- bias correction


def _biased_conv() -> onnx.ModelProto:
    """A Conv whose per-tensor weight rounding errs the same way in every channel (w = (k + 0.4) * step),
    read by positive inputs: quantization shifts every output channel's mean."""
    rng = np.random.default_rng(0)
    step = np.float32(0.01)
    k = rng.integers(-40, 40, (6, 4, 3, 3)).astype(np.float32)
    w = (k + 0.4) * step
    w[0, 0, 0, 0] = 127 * step  # sets the per-tensor scale to exactly `step`
    return model("""g (float[1,4,8,8] inp) => (float[1,6,8,8] out) {
        out = Conv <pads=[1,1,1,1]> (inp, W, B)
    }""", {"W": w, "B": weights(6)})


def _channel_shift(proto, qmodel, feeds) -> np.ndarray:
    diffs = [run_ort(qmodel, f)["out"] - run_ort(proto, f)["out"] for f in feeds]
    return np.mean(diffs, axis=(0, 1, 3, 4))


def test_bias_correction_removes_the_mean_output_shift(tmp_path):
    proto = _biased_conv()
    feeds = [{"inp": np.abs(f["inp"]) + 1.0} for f in feeds_for(proto, n=8)]
    held = [{"inp": np.abs(f["inp"]) + 1.0} for f in feeds_for(proto, n=4, seed=7)]
    shifts = {}
    for bc in (False, True):
        res = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", per_channel=False, tune=False,
                                  cache_dir=False, bias_correction=bc, reduce_range=False)  # the 8-bit grid
        shifts[bc] = np.abs(_channel_shift(proto, res.model, held))
    assert shifts[False].mean() > 0.05  # the deliberate bias is there
    assert shifts[True].mean() < shifts[False].mean() / 5, shifts
    assert res.recovery["bias_correction"]["layers_corrected"] == 1


# ---------------------------------------------------------------- mixed precision


def test_mixed_precision_meets_a_budget_plain_int8_misses(tmp_path, capsys):
    proto = fragile_chain()
    feeds = feeds_for(proto, n=6)
    kw = {"per_channel": False, "tune": False, "cache_dir": False, "method": "minmax",
          "reduce_range": False}  # plain 8-bit int8
    plain = onnxshrink.quantize(proto, feeds, tmp_path / "p.onnx", **kw)
    plain_drift = 1 - validate.compare(proto, plain.output, feeds).overall["cosine"]
    budget = plain_drift / 10
    capsys.readouterr()
    res = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", max_drift=budget, progress=True, **kw)
    mp = res.recovery["mixed_precision"]
    assert mp["met"] and mp["initial"]["drift"] > budget >= mp["final"]["drift"]
    assert f"keeping nodes float {len(mp['evaluations']) - 1} builds" in capsys.readouterr().err  # its bar
    assert 1 - validate.compare(proto, res.output, feeds).overall["cosine"] <= budget * 1.001
    kept = [r["node"] for r in mp["kept_float"]]
    assert kept and len(kept) < 3 and all(r["added_noise"] > 0 for r in mp["kept_float"])
    assert res.quantized_nodes >= 1 and any("drift budget" in s for s in res.skipped)
    assert len(mp["evaluations"]) <= 4
    out = res.to_dict()
    assert out["recovery"]["mixed_precision"]["kept_float"][0]["node"] == kept[0]
    with pytest.raises(ConfigError):
        onnxshrink.quantize(proto, feeds, max_metric_drop=0.01, cache_dir=False)


def test_metric_budget_uses_labels_kept_with_the_data(tmp_path):
    proto = model("""g (float[4,16] inp) => (float[4,5] out) {
        h = Gemm <transB=1> (inp, G1, C1)
        r = Relu(h)
        out = Gemm <transB=1> (r, G2, C2)
    }""", {"G1": weights(32, 16), "C1": weights(32), "G2": weights(5, 32), "C2": weights(5)})
    feeds = feeds_for(proto, n=6)
    ref = [run_ort(proto, f)["out"].argmax(1) for f in feeds]
    labeled = [{**f, "labels": y} for f, y in zip(feeds, ref)]
    res = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", tune=False, cache_dir=False,
                              max_metric_drop=0.0, metric="accuracy", drift_data=labeled)
    mp = res.recovery["mixed_precision"]
    assert mp["met"] and mp["final"]["metric_drop"] <= 0.0


# ---------------------------------------------------------------- CLI


def test_cli_recovery_flags_and_dynamic_mode(tmp_path, capsys):
    proto = fragile_chain()
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    data = tmp_path / "calib"
    data.mkdir()
    for i, feed in enumerate(feeds_for(proto, n=4)):
        np.savez(data / f"{i:03d}.npz", **feed)
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    rc = cli.main(["optimize", str(src), "-o", str(out), "--quantize", "int8", "--calibration", str(data),
                   "--per-tensor", "--no-tune", "--equalize", "--bias-correction", "--max-drift", "1e-5",
                   "--report", str(rep)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cross_layer_equalization" in printed and "bias correction" in printed and "drift budget" in printed
    report = json.loads(rep.read_text())
    assert {"cross_layer_equalization", "bias_correction", "mixed_precision"} <= set(report["recovery"])
    assert report["recovery"]["mixed_precision"]["kept_float"]
    mlp = model("""g (float[2,16] inp) => (float[2,4] out) {
        out = Gemm <transB=1> (inp, G, C)
    }""", {"G": weights(4, 16), "C": weights(4)})
    onnx.save(mlp, src)
    assert cli.main(["optimize", str(src), "-o", str(out), "--quantize", "dynamic"]) == 0
    assert "1 linear layers dynamic" in capsys.readouterr().out
    assert cli.main(["optimize", str(src), "--quantize", "dynamic", "--max-drift", "0.1"]) == ConfigError.exit_code
    assert cli.main(["optimize", str(src), "--quantize", "int8", "--calibration", str(data),
                     "--max-metric-drop", "0.1"]) == ConfigError.exit_code
