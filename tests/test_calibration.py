"""calibrate(): taps, subgraph lifting, batching, cache, bad data, fallbacks, the one-batch memory bound."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import zoo
from onnxshrink.calib_runner import TapRunner
from onnxshrink.calib_taps import Tap, open_session, plan_taps
from onnxshrink.calibration import MIN_SPAN, CalibrationTable, calibrate, calibrate_methods
from onnxshrink.data import InputSpec
from onnxshrink.errors import ConfigError, DataError

RNG = np.random.default_rng(7)


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def odd_names_model(batch="N") -> onnx.ModelProto:
    """Names with ':' and '/' and shared prefixes: a=2x, b=3x, c=a+b, d=relu(c), out=d-a."""
    nodes = [
        helper.make_node("Mul", ["in:0", "two"], ["blk/out:0"]),
        helper.make_node("Mul", ["in:0", "three"], ["blk/out:0/x"]),
        helper.make_node("Add", ["blk/out:0", "blk/out:0/x"], ["blk/out"]),
        helper.make_node("Relu", ["blk/out"], ["blk/out:1"]),
        helper.make_node("Sub", ["blk/out:1", "blk/out:0"], ["out"]),
    ]
    return _model(nodes, [_f("in:0", [batch, 4])], [_f("out", [batch, 4])],
                  [_const("two", 2.0), _const("three", 3.0)])


def odd_feeds(n=20, rows=1):
    return [{"in:0": RNG.standard_normal((rows, 4)).astype(np.float32)} for _ in range(n)]


def expected_odd(feeds):
    x = np.concatenate([f["in:0"] for f in feeds])
    return {"in:0": x, "blk/out:0": 2 * x, "blk/out:0/x": 3 * x, "blk/out": 5 * x,
            "blk/out:1": np.maximum(5 * x, 0), "out": np.maximum(5 * x, 0) - 2 * x}


@pytest.fixture
def runs(monkeypatch):
    """Counts ONNX Runtime session runs."""
    import onnxruntime as ort

    counter = {"n": 0}
    original = ort.InferenceSession.run

    def counting(self, *args, **kwargs):
        counter["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counting)
    return counter


def test_taps_mapped_through_odd_names(runs):
    feeds = odd_feeds()
    table = calibrate(odd_names_model(), feeds, cache_dir=False, progress=False)
    expected = expected_odd(feeds)
    assert set(table.ranges) == set(expected)
    for name, arr in expected.items():
        r = table[name]
        assert (r.min, r.max) == pytest.approx((arr.min(), arr.max()), rel=1e-6), name
        assert r.count == arr.size and r.outliers == 0 and r.note is None
    # 20 feeds: 1 to size the outputs, 1 single run of the first stacked feed to check that stacking keeps
    # each feed's outputs, then stacked 8 + 8 + 3 on the batch axis
    assert runs["n"] == 5


def test_static_batch_runs_one_feed_at_a_time(runs):
    feeds = odd_feeds(5)
    table = calibrate(odd_names_model(batch=1), feeds, cache_dir=False, progress=False)
    assert runs["n"] == 5 and table.samples == 5
    assert table["blk/out"].max == pytest.approx(expected_odd(feeds)["blk/out"].max())


def test_feeds_with_other_shapes_start_a_new_batch(runs):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_f("x", ["N", "T"])], [_f("y", ["N", "T"])])
    feeds = [{"x": RNG.standard_normal((1, t)).astype(np.float32)} for t in (3, 3, 5, 5, 5)]
    table = calibrate(model, feeds, cache_dir=False, progress=False)
    assert runs["n"] == 4 and table["y"].count == 21  # [3], [3], [5, 5, 5] and its check run


def test_failed_stacked_run_falls_back_to_single_feeds(runs):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    shape = numpy_helper.from_array(np.array([1, 4], np.int64), "shape")
    model = _model(nodes, [_f("x", ["N", 4])], [_f("y", [1, 4])], [shape])
    feeds = [{"x": RNG.standard_normal((1, 4)).astype(np.float32)} for _ in range(4)]
    table = calibrate(model, feeds, cache_dir=False, progress=False)
    x = np.concatenate([f["x"] for f in feeds])
    assert table["y"].min == pytest.approx(-x.max()) and table["y"].count == 16
    assert runs["n"] == 1 + 4


def test_tensor_selection_by_name_and_value():
    model = ir.serde.deserialize_model(odd_names_model())
    relu = next(n for n in model.graph if n.op_type == "Relu").outputs[0]
    table = calibrate(model, odd_feeds(4), [relu, "blk/out:0"], cache_dir=False, progress=False)
    assert set(table.ranges) == {"blk/out:1", "blk/out:0"}
    assert relu in table and table[relu].min == 0.0
    assert len(model.graph.outputs) == 1 and model.graph.outputs[0].name == "out"  # not modified


@pytest.mark.parametrize("tensors, match", [
    (["blk/out:2"], "no tensor named"),
    (["two"], "initializer"),
    (["blk/out", "blk/out"], "twice"),
])
def test_bad_tensor_selection(tensors, match):
    with pytest.raises(ConfigError, match=match):
        calibrate(odd_names_model(), odd_feeds(2), tensors, cache_dir=False, progress=False)


def test_non_float_tensor_refused():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Relu", ["x"], ["y"])]
    model = _model(nodes, [_f("x", ["N", 4])], [_f("y", ["N", 4])])
    with pytest.raises(ConfigError, match="not float"):
        calibrate(model, [{"x": np.ones((1, 4), np.float32)}], ["s"], cache_dir=False)


@pytest.mark.parametrize("bad, match", [
    ([{"x": np.ones((1, 4), np.float32)}], "missing"),
    ([{"in:0": np.ones((1, 4), np.float64)}], "dtype"),
    ([{"in:0": np.ones((1, 5), np.float32)}], "dim 1 must be 4"),
    ([{"in:0": np.ones((4,), np.float32)}], "rank"),
    ([{"in:0": np.ones((0, 4), np.float32)}], "empty"),
    ([], "no feeds"),
    ([{"in:0": np.ones((1, 4), np.float32)}] * 5 + [{"in:0": np.full((1, 4), np.nan, np.float32)}], "NaN"),
])
def test_bad_data_raises_before_any_run(bad, match, runs):
    with pytest.raises(DataError, match=match):
        calibrate(odd_names_model(), bad, cache_dir=False, progress=False)
    assert runs["n"] == 0


def test_constant_tensors_get_a_safe_nonzero_range():
    nodes = [helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Add", ["z", "five"], ["f"]),
             helper.make_node("Add", ["f", "x"], ["y"])]
    model = _model(nodes, [_f("x", ["N", 4])], [_f("y", ["N", 4])], [_const("zero", 0.0), _const("five", -5.0)])
    table = calibrate(model, [{"x": RNG.random((1, 4), np.float32)}] * 3,
                      cache_dir=False, progress=False, method="entropy")
    z, f = table["z"], table["f"]
    assert (z.min, z.max) == (0.0, MIN_SPAN) and "constant" in z.note and "widened" in z.note
    assert (f.min, f.max) == (-5.0, 0.0) and "constant value -5" in f.note
    assert table["y"].note is None


def test_masks_of_huge_values_are_excluded_and_counted():
    nodes = [helper.make_node("Add", ["x", "mask"], ["y"]), helper.make_node("Softmax", ["y"], ["p"])]
    model = _model(nodes, [_f("x", ["N", 4]), _f("mask", ["N", 4])], [_f("p", ["N", 4])])
    feeds = []
    for i in range(6):
        mask = np.zeros((1, 4), np.float32)
        mask[0, 3] = -1e9 if i % 2 else np.finfo(np.float32).min
        feeds.append({"x": RNG.standard_normal((1, 4)).astype(np.float32), "mask": mask})
    for method in ("minmax", "percentile"):
        table = calibrate(model, feeds, cache_dir=False, progress=False, method=method)
        x = np.concatenate([f["x"] for f in feeds])
        assert table["y"].observed_min == pytest.approx(x[:, :3].min())
        assert table["y"].outliers == 6 and table["mask"].outliers == 6 and "outliers" in table["y"].note
        assert table["mask"].min == 0.0 and table["p"].outliers == 0


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, bool c) => (float[N, 4] y) {
  a = Relu(x)
  y = If(c) <
    then_branch = t () => (float[N, 4] o1) { o1 = Mul(a, a) },
    else_branch = e () => (float[N, 4] o2) { inner = Neg(a)
                                              o2 = Sigmoid(inner) }
  >
}
"""

LOOP_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, int64 n) => (float[N, 4] y) {
  cond = Constant <value = bool {1}> ()
  y = Loop(n, cond, x) <
    body = b (int64 i, bool ci, float[N, 4] acc) => (bool co, float[N, 4] acc2) {
      co = Identity(ci)
      h = Tanh(acc)
      acc2 = Add(h, acc)
    }
  >
}
"""


def test_if_branch_values_are_lifted():
    model = onnx.parser.parse_model(IF_MODEL)
    feeds = [{"x": RNG.standard_normal((1, 4)).astype(np.float32), "c": np.array(i % 3 != 0)} for i in range(9)]
    table = calibrate(model, feeds, cache_dir=False, progress=False)
    a_then = np.maximum(np.concatenate([f["x"] for f in feeds if f["c"]]), 0)
    a_else = np.maximum(np.concatenate([f["x"] for f in feeds if not f["c"]]), 0)
    assert table["o1"].max == pytest.approx((a_then**2).max()) and table["o1"].count == a_then.size
    assert table["inner"].min == pytest.approx(-a_else.max()) and table["inner"].count == a_else.size
    assert table["o2"].max == pytest.approx(1 / (1 + np.exp(a_else.min())), rel=1e-5)
    only_then = [f for f in feeds if f["c"]]
    assert calibrate(model, only_then, cache_dir=False, progress=False).unobserved == ("inner", "o2")


@pytest.mark.parametrize("method", ["minmax", "mse"])  # reduced in the graph / whole tensors
def test_loop_body_values_are_lifted_with_channel_means(method):
    model = onnx.parser.parse_model(LOOP_MODEL)
    feeds = [{"x": RNG.standard_normal((2, 4)).astype(np.float32), "n": np.array(3, np.int64)} for _ in range(4)]
    table = calibrate(model, feeds, cache_dir=False, progress=False, channel_means=["h"], method=method)
    hs = []
    for f in feeds:
        acc = f["x"]
        for _ in range(3):
            hs.append(np.tanh(acc))
            acc = np.tanh(acc) + acc
    h = np.concatenate(hs)
    assert table["h"].observed_min == pytest.approx(h.min(), rel=1e-5) and table["h"].count == h.size
    np.testing.assert_allclose(table["h"].channel_mean, h.mean(axis=0), rtol=1e-5)


SCAN_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[T, 4] x) => (float[4] s, float[T, 4] ys) {
  init = Constant <value = float[4] {0, 0, 0, 0}> ()
  s, ys = Scan <num_scan_inputs = 1, scan_output_axes = [0],
                body = b (float[4] acc, float[4] xi) => (float[4] acc2, float[4] yi) {
    t = Tanh(xi)
    acc2 = Add(acc, t)
    yi = Mul(t, xi)
  }> (init, x)
}
"""


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_scan_body_values_are_lifted(method):
    model = onnx.parser.parse_model(SCAN_MODEL)
    feeds = [{"x": RNG.standard_normal((3, 4)).astype(np.float32)} for _ in range(4)]
    table = calibrate(model, feeds, cache_dir=False, progress=False, method=method)
    t = np.tanh(np.concatenate([f["x"] for f in feeds]))
    assert table["t"].observed_max == pytest.approx(t.max(), rel=1e-6) and table["t"].count == t.size
    # axis 0 is time here, not a batch: stacking is refused, so each feed's sums start from zero
    acc2 = np.concatenate([np.cumsum(np.tanh(f["x"]), axis=0) for f in feeds])
    assert table["acc2"].observed_max == pytest.approx(acc2.max(), rel=1e-5) and table["acc2"].count == t.size


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_channel_means_along_axis_1(method):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_f("x", ["N", 3, 2, 2])], [_f("y", ["N", 3, 2, 2])])
    feeds = [{"x": RNG.standard_normal((1, 3, 2, 2)).astype(np.float32)} for _ in range(10)]
    table = calibrate(model, feeds, cache_dir=False, progress=False, channel_means=["y"], method=method)
    y = np.maximum(np.concatenate([f["x"] for f in feeds]), 0)
    np.testing.assert_allclose(table["y"].channel_mean, y.mean(axis=(0, 2, 3)), rtol=1e-6)
    assert table["x"].channel_mean is None


def test_cache_hit_does_not_run_the_model(tmp_path, runs):
    feeds = odd_feeds(6)
    first = calibrate(odd_names_model(), feeds, cache_dir=tmp_path, progress=False)
    n = runs["n"]
    assert n > 0
    again = calibrate(odd_names_model(), feeds, cache_dir=tmp_path, progress=False)
    assert runs["n"] == n and again == first
    calibrate(odd_names_model(), odd_feeds(6), cache_dir=tmp_path, progress=False)  # other data
    assert runs["n"] > n


def test_histograms_cached_for_other_methods(tmp_path, runs):
    feeds = odd_feeds(6)
    kw = {"cache_dir": tmp_path, "progress": False}
    pct = calibrate(odd_names_model(), feeds, method="percentile", **kw)
    n = runs["n"]
    ent = calibrate(odd_names_model(), feeds, method="entropy", **kw)
    mse = calibrate(odd_names_model(), feeds, method="mse", symmetric=True, **kw)
    mm = calibrate(odd_names_model(), feeds, method="minmax", **kw)
    assert runs["n"] == n
    assert ent.method == "entropy" and mse["out"].min == -mse["out"].max
    fresh = calibrate(odd_names_model(), feeds, method="minmax", cache_dir=False, progress=False)
    assert mm.ranges == fresh.ranges and pct["out"].observed_max == fresh["out"].max


def test_several_methods_from_one_run_without_cache(runs):
    feeds = odd_feeds(6)
    kw = {"cache_dir": False, "progress": False}
    both = calibrate_methods(odd_names_model(), feeds, methods=("minmax", "percentile"), **kw)
    n_both = runs["n"]
    pct = calibrate(odd_names_model(), feeds, method="percentile", **kw)
    assert runs["n"] - n_both == n_both  # one table's worth of runs answered both methods
    assert list(both) == ["minmax", "percentile"] and both["minmax"].method == "minmax"
    assert both["minmax"].ranges == calibrate(odd_names_model(), feeds, method="minmax", **kw).ranges
    assert both["percentile"].ranges == pct.ranges


def test_fetched_taps_get_the_smaller_batch_cap():
    from onnxshrink.calib_runner import MAX_BATCH_BYTES, MAX_FETCH_BYTES

    specs = [InputSpec("x", np.dtype(np.float32), ("N", 4))]
    assert TapRunner(_EchoSession(), [Tap("y", output=0)], specs).max_batch_bytes == MAX_FETCH_BYTES
    assert TapRunner(_EchoSession(), [Tap("y", stats=(0, 1, 2, 3))], specs).max_batch_bytes == MAX_BATCH_BYTES


def test_table_json_round_trip(tmp_path):
    table = calibrate(odd_names_model(), odd_feeds(3), cache_dir=False, progress=False, channel_means=["out"])
    table.to_json(tmp_path / "t.json")
    assert CalibrationTable.from_json(tmp_path / "t.json") == table


def test_external_data_model_by_path(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    onnx.save(odd_names_model(), folder / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    before = sorted(p.name for p in folder.iterdir())
    feeds = odd_feeds(5)
    table = calibrate(folder / "m.onnx", feeds, cache_dir=False, progress=False)
    assert table["blk/out:0/x"].max == pytest.approx(expected_odd(feeds)["blk/out:0/x"].max())
    assert sorted(p.name for p in folder.iterdir()) == before
    with pytest.raises(ConfigError, match="names"):
        calibrate(folder / "m.onnx", feeds, [ir.Value(name="x")], cache_dir=False)


def test_progress_reports(capsys):
    calls = []
    calibrate(odd_names_model(), odd_feeds(10), cache_dir=False, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (10, 10) and all(t == 10 for _, t in calls)
    calibrate(odd_names_model(), odd_feeds(10), cache_dir=False, progress=True)
    assert "10/10 samples" in capsys.readouterr().err


def test_minmax_taps_are_reduced_in_the_graph():
    model = ir.serde.deserialize_model(odd_names_model())
    plan = plan_taps(model, reduce=True, channel_means=["out"])
    assert all(t.stats is not None for t in plan.taps if t.feed is None)
    session = open_session(plan)
    outs = session.run(None, odd_feeds(1, rows=3)[0])
    checks = set(plan.checks)  # the model's own output, kept whole to check stacking
    assert [o.shape for i, o in enumerate(outs) if i in checks] == [(3, 4)]
    assert all(o.size <= 4 for i, o in enumerate(outs) if i not in checks)  # scalars, 4 channel sums
    with pytest.raises(ConfigError, match="channel_means"):
        plan_taps(model, ["out"], channel_means=["blk/out"])


class _FakeSession:
    """Checks, at every run, how many feeds the runner has pulled but not yet handed to observers."""

    def __init__(self, state, batch_size):
        self.state, self.batch_size = state, batch_size

    def run(self, names, feed):
        held = self.state["pulled"] - self.state["observed"]
        assert feed["x"].shape[0] <= held <= self.batch_size
        self.state["max_held"] = max(self.state["max_held"], held)
        return [feed["x"] * 2]


def test_runner_holds_at_most_one_batch():
    state = {"pulled": 0, "observed": 0, "max_held": 0}

    def source():
        for _ in range(50):
            state["pulled"] += 1
            yield {"x": np.ones((1, 4), np.float32)}

    specs = [InputSpec("x", np.dtype(np.float32), ("N", 4))]
    runner = TapRunner(_FakeSession(state, 8), [Tap("y", output=0)], specs, batch_size=8)
    runner.run(source(), lambda i, a: None, lambda n: state.__setitem__("observed", state["observed"] + n))
    # a probe run, a check run of the first stacked feed, 6 stacked batches of 8 and the last feed
    assert runner.runs == 9 and state["max_held"] == 8 and state["observed"] == 50



class _EchoSession:
    def run(self, names, feed):
        return [feed["x"]]


def test_runner_caps_batches_by_output_bytes():
    feeds = [{"x": np.ones((1, 4), np.float32)} for _ in range(10)]
    specs = [InputSpec("x", np.dtype(np.float32), ("N", 4))]
    rows = []
    runner = TapRunner(_EchoSession(), [Tap("y", output=0)], specs, batch_size=8, max_batch_bytes=40)
    runner.run(feeds, lambda i, a: rows.append(a.shape[0]))
    assert runner.batch_size == 2 and rows == [1, 2, 2, 2, 2, 1]  # 16 bytes of outputs per feed


def test_model_fingerprint_follows_weights_not_identity():
    from onnxshrink.calib_fingerprint import model_fingerprint

    a = ir.serde.deserialize_model(odd_names_model())
    b = ir.serde.deserialize_model(odd_names_model())
    assert model_fingerprint(a) == model_fingerprint(b)
    b.graph.initializers["two"].const_value = ir.tensor(np.array(2.5, np.float32))
    assert model_fingerprint(a) != model_fingerprint(b)


def test_trimmed_tap_model_runs_only_what_the_taps_need():
    """ONNX Runtime runs every node of a session whatever outputs a run asks for; reconstruction taps
    one stage at a time, so its tap models drop the model's own outputs and the nodes after the taps."""
    from onnxshrink.importance import TapReader

    model = ir.serde.deserialize_model(zoo.build("resnet"))
    convs = [n for n in model.graph if n.op_type == "Conv"]
    early = convs[1].outputs[0]
    whole, trimmed = plan_taps(model, [early]), plan_taps(model, [early], trim=True)
    assert whole.checks and not trimmed.checks
    assert len(list(trimmed.model.graph)) < len(list(whole.model.graph)) == len(list(model.graph))
    assert not any(n.op_type == "Gemm" for n in trimmed.model.graph)
    feed = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    got = TapReader(model, [early])(feed)[0]
    ref = open_session(whole).run(None, feed)[whole.taps[0].output]
    np.testing.assert_array_equal(got, ref)
