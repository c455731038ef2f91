"""End to end: the default (lossless) preset on every zoo model and every trained digits classifier.

After ``onnxshrink.optimize(..., preset="default")`` the model passes the full onnx checker, keeps its
interface, gives the same ONNX Runtime outputs (rtol 1e-4, atol 1e-5) on random and real inputs, and a
second run changes nothing.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

import onnxshrink
from models import digits, zoo

CASES = [*sorted(zoo.ZOO), *(f"digits_{n}" for n in digits.TRAINED)]


def interface(path) -> list[tuple]:
    """(kind, name, elem type, dims) of every graph input and output."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}

    def desc(kind, vi):
        t = vi.type.tensor_type
        dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim)
        return kind, vi.name, t.elem_type, dims if t.HasField("shape") else None

    return [desc("in", v) for v in g.input if v.name not in inits] + [desc("out", v) for v in g.output]


def op_counts(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _model_and_feeds(name: str, tmp_path, make_feeds):
    if name.startswith("digits_"):
        short = name.removeprefix("digits_")
        path = digits.trained_path(short)
        x, _ = digits.model_input(short, "test")
        real = [{"input": x[:32]}, {"input": x[-3:]}]
        return path, real + make_feeds(path, batch=2, n=1, seed=7)
    path = zoo.save(name, tmp_path)
    return path, make_feeds(path, batch=1, n=2, seed=0) + make_feeds(path, batch=3, n=2, seed=10)


def assert_lossless(src, feeds, tmp_path, ort_run, assert_close) -> tuple:
    """Optimize ``src`` twice with the default preset and check every lossless promise."""
    out = tmp_path / "optimized.onnx"
    result = onnxshrink.optimize(str(src), str(out), preset="default")
    onnx.checker.check_model(str(out), full_check=True)
    assert interface(out) == interface(src)
    assert result.after["nodes"] <= result.before["nodes"]
    assert not result.input_problems
    for feed in feeds:
        assert_close(ort_run(out, feed), ort_run(src, feed))
    again = onnxshrink.optimize(str(out), str(tmp_path / "again.onnx"), preset="default")
    counts = {name: row["counts"] for name, row in again.report.per_pass().items() if row["counts"]}
    assert not counts, f"a second run still changed the model: {counts}"
    assert again.after["ops"] == result.after["ops"]
    return result, out


@pytest.mark.parametrize("name", CASES)
def test_default_preset_is_lossless(name, tmp_path, ort_run, assert_close, make_feeds):
    src, feeds = _model_and_feeds(name, tmp_path, make_feeds)
    assert_lossless(src, feeds, tmp_path, ort_run, assert_close)


def test_default_preset_removes_the_exporter_leftovers(tmp_path, ort_run, assert_close, make_feeds):
    """The lossless_patterns model carries patterns the preset must remove (it must fire)."""
    src, feeds = _model_and_feeds("lossless_patterns", tmp_path, make_feeds)
    result, out = assert_lossless(src, feeds, tmp_path, ort_run, assert_close)
    ops = op_counts(out)
    for op in ("Identity", "Dropout", "BatchNormalization", "Cast", "Shape", "ReduceProd"):
        assert ops[op] == 0, f"{op} left after the default preset: {dict(ops)}"
    assert result.after["nodes"] < result.before["nodes"] // 2


def test_default_preset_keeps_control_flow_valid(tmp_path, ort_run, assert_close):
    """Both If branches still give the original outputs (these seeds take each branch, see test_zoo)."""
    src = zoo.save("control_flow", tmp_path)
    out = tmp_path / "optimized.onnx"
    onnxshrink.optimize(str(src), str(out), preset="default")
    assert op_counts(out)["If"] == 1 and op_counts(out)["Loop"] == 1
    for seed in range(8):
        feed = {"input": np.random.default_rng(seed).standard_normal((1, 8)).astype(np.float32)}
        assert_close(ort_run(out, feed), ort_run(src, feed))
