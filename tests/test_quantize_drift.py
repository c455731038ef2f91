"""Without a drift budget, ``quantize`` measures the int8 model's drift on calibration feeds and warns
when it is over ``WARN_DRIFT``; a budget (``max_drift``) replaces the warning with the fallback search."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from models import zoo
from onnxshrink import cli
from onnxshrink.validate import WARN_DRIFT
from tests.conftest import fetch_or_skip
from tests.qdq_helpers import feeds_for


def _log_spectrum() -> onnx.ModelProto:
    """A log power spectrum of int16-range audio (openWakeWord's melspectrogram in small): Conv filters,
    square, log. Quiet feeds lose their signal to the input's 8-bit steps, and log magnifies that."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.1, (16, 1, 1, 64)).astype(np.float32), "w")
    eps = numpy_helper.from_array(np.array(1e-6, np.float32), "eps")
    nodes = [helper.make_node("Conv", ["x", "w"], ["s"], strides=[1, 32]),
             helper.make_node("Mul", ["s", "s"], ["p"]),
             helper.make_node("Add", ["p", "eps"], ["pe"]),
             helper.make_node("Log", ["pe"], ["y"])]
    graph = helper.make_graph(nodes, "spec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 2048])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 1, 63])], [w, eps])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _audio_feeds(n: int = 8) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": (rng.normal(0, 1, (1, 1, 1, 2048)) * 10 ** rng.uniform(1, 4)).astype(np.float32)} for _ in range(n)]


def test_large_drift_is_measured_and_warned_of(tmp_path):
    result = onnxshrink.quantize(_log_spectrum(), _audio_feeds(), tmp_path / "q.onnx", cache_dir=False, tune=False)
    measured = result.recovery["drift"]
    assert measured["feeds"] == 4 and measured["drift"] > WARN_DRIFT
    assert any("int8 changed the outputs a lot" in w and "--max-drift" in w for w in result.warnings)


def test_drift_budget_replaces_the_warning(tmp_path):
    result = onnxshrink.quantize(_log_spectrum(), _audio_feeds(), tmp_path / "q.onnx", cache_dir=False, tune=False,
                                 max_drift=WARN_DRIFT)
    assert "drift" not in result.recovery and result.recovery["mixed_precision"]["met"]
    assert not any("changed the outputs" in w for w in result.warnings)


def test_small_drift_is_reported_without_a_warning(tmp_path, capsys):
    proto = zoo.build("resnet")
    src, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(proto, src)
    feeds = feeds_for(proto, n=4, batch=2)
    np.savez(data, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    assert cli.main(["optimize", str(src), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8",
                     "--calibration", str(data), "--no-tune"]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("drift against float"))
    assert float(line.split("1 - cosine ")[1].split()[0]) <= WARN_DRIFT
    assert "changed the outputs a lot" not in printed


@pytest.mark.realmodel
def test_real_melspectrogram_is_warned_of(tmp_path):
    from models import fetch_real

    path = fetch_or_skip("oww_melspectrogram")
    result = onnxshrink.quantize(path, fetch_real.example_feeds("oww_melspectrogram", 8), tmp_path / "q.onnx",
                                 cache_dir=False)
    assert result.recovery["drift"]["drift"] > WARN_DRIFT
    assert any("int8 changed the outputs a lot" in w for w in result.warnings)


def test_a_drift_measurement_that_fails_is_noted_not_raised(tmp_path, monkeypatch):
    """ONNX Runtime's own errors (not ShrinkErrors) in the measurement leave the model written and the
    reason in the note, with no warning."""
    from onnxshrink import mixed_precision

    def fail(*_args, **_kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : no kernel")

    monkeypatch.setattr(mixed_precision, "drift", fail)
    result = onnxshrink.quantize(_log_spectrum(), _audio_feeds(), tmp_path / "q.onnx", cache_dir=False, tune=False)
    assert result.output.exists() and result.recovery["drift"]["drift"] is None
    assert "no kernel" in result.recovery["drift"]["why"]
    assert not any("changed the outputs" in w for w in result.warnings)


def test_a_failed_drift_run_is_a_note_not_an_error(tmp_path, monkeypatch):
    """When the drift measurement cannot run (ONNX Runtime refusing the int8 model on some provider),
    quantize still writes the model and records why the drift is missing, without a drift warning."""
    from onnxshrink import mixed_precision

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation")

    monkeypatch.setattr(mixed_precision, "drift", refuse)
    out = tmp_path / "q.onnx"
    result = onnxshrink.quantize(_log_spectrum(), _audio_feeds(), out, cache_dir=False, tune=False)
    note = result.recovery["drift"]
    assert note["drift"] is None and "NOT_IMPLEMENTED" in note["why"]
    assert not any("changed the outputs" in w for w in result.warnings)
    assert out.exists() and onnx.load(out).graph.node


def test_the_cli_says_when_drift_was_not_measured(tmp_path, monkeypatch, capsys):
    from onnxshrink import mixed_precision

    def refuse(*args, **kwargs):
        raise RuntimeError("no kernel for this op")

    monkeypatch.setattr(mixed_precision, "drift", refuse)
    src, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(_log_spectrum(), src)
    feeds = _audio_feeds()
    np.savez(data, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    assert cli.main(["optimize", str(src), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8",
                     "--calibration", str(data), "--no-tune"]) == 0
    assert "drift against float: not measured (no kernel for this op)" in capsys.readouterr().out
