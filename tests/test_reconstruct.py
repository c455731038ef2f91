"""Least-squares reconstruction and BatchNorm re-estimation after pruning, on the trained digits nets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import digits
from onnxshrink import model_io, pruning, runtime
from onnxshrink.normal_eq import Normal, Rows, Sums
from onnxshrink.reconstruct import _folds
from onnxshrink.reconstruct_layers import im2col

CALIB = 96  # samples: enough for the small layers, fast on two cores


def test_im2col_matches_onnxruntime_conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 2], strides=[2, 1],
                                 pads=[1, 0, 2, 1], dilations=[1, 2])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    y = runtime.make_session(proto.SerializeToString()).run(None, {"x": x})[0]
    cols = im2col(x, (3, 2), [2, 1], [1, 2], [1, 0, 2, 1])
    ours = (cols @ w.reshape(5, -1).T).reshape(2, y.shape[2], y.shape[3], 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, y, rtol=1e-4, atol=1e-4)


def test_streamed_normal_equations_match_one_shot_least_squares():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 7)).astype(np.float32)
    y = (x @ rng.standard_normal((7, 3)) + 0.5 + 0.01 * rng.standard_normal((600, 3))).astype(np.float32)
    ne = Normal()
    for i in range(0, 600, 128):
        ne.add(x[i:i + 128], y[i:i + 128], np.arange(len(x[i:i + 128])) % 2)
    w, before, after = ne.solve(1e-9, np.zeros((8, 3)))
    ref = np.linalg.lstsq(np.c_[x, np.ones(600)], y, rcond=None)[0]
    np.testing.assert_allclose(w, ref, rtol=1e-3, atol=1e-3)
    assert after < 1e-3 < before


def test_refit_keeps_weights_that_held_out_rows_do_not_improve():
    """40 rows of 60 inputs: any refit fits the rows it sees exactly; with targets unrelated to the
    inputs it predicts held-out rows no better than the current weights, which stay. With signal,
    the refit is taken (ridge chosen by cross-validation)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 60)).astype(np.float32)
    w0 = np.zeros((61, 2))
    noise = Normal()
    noise.add(x, rng.standard_normal((40, 2)).astype(np.float32), np.arange(40) % 2)
    w, before, after = noise.solve(1e-3, w0)
    assert noise.ridge is None and w is w0 and after == before
    true = rng.standard_normal((60, 2))
    signal = Normal()
    for i in range(0, 400, 40):
        xi = rng.standard_normal((40, 60)).astype(np.float32)
        signal.add(xi, (xi @ true).astype(np.float32), np.arange(40) % 2)
    w, before, after = signal.solve(1e-3, w0)
    assert signal.ridge is not None and after < 0.01 * before
    np.testing.assert_allclose(w[:-1], true, atol=0.05)


def test_folds_keep_each_sample_whole_and_alternate_across_feeds():
    """Rows of one sample (a Conv's patch positions, in order) go to one fold; samples alternate, also
    across feeds. Alternate rows split an even-width map into its even and odd columns instead."""
    rng = np.random.default_rng(0)
    x = np.zeros((3, 4, 6, 8), np.float32)  # 3 samples, 6x8 patch positions each
    fold, seen = _folds(3 * 48, x, 0, rng)
    assert seen == 3 and fold.tolist() == [0] * 48 + [1] * 48 + [0] * 48
    fold, seen = _folds(2 * 48, x[:2], seen, rng)
    assert seen == 5 and fold.tolist() == [1] * 48 + [0] * 48
    fold, _ = _folds(7, x[:2], 0, rng)  # rows not sample by sample (a transposed Gemm input): random
    assert set(fold.tolist()) <= {0, 1} and len(fold) == 7


@pytest.mark.realmodel
def test_refit_is_judged_on_held_out_samples_on_a_real_model():
    """openWakeWord's embedding model (even-width maps): with folds of alternate rows, 14 of its 16
    refit layers kept their pruned weights and held-out audio drifted 0.054 (a one-off run before the
    change); now every refit is taken, halves its layer's error, and the held-out drift is under 0.045."""
    from models import fetch_real
    from onnxshrink import validate
    from tests.conftest import fetch_or_skip

    path = str(fetch_or_skip("oww_embedding"))
    calib = fetch_real.example_feeds("oww_embedding", 16, seed=0)
    result = pruning.prune(path, 0.3, criterion="reconstruction", calibration=calib, reconstruct="lsq")
    refit = result.reconstruction["refit"]
    assert len(refit) == 16 and all(r["ridge"] is not None and r["mse_after"] < 0.5 * r["mse_before"]
                                    for r in refit)
    held_out = validate.compare(path, result.model, fetch_real.example_feeds("oww_embedding", 16, seed=100))
    assert 1 - held_out.overall["cosine"] < 0.045


def _accuracy(model, name: str) -> float:
    x, y = digits.model_input(name, "test")
    session = runtime.make_session(model, threads=1)
    return digits.accuracy(session.run(None, {"input": x})[0], y)


def _logit_error(model, name: str) -> float:
    x, _ = digits.model_input(name, "test")
    ref = runtime.make_session(str(digits.trained_path(name)), threads=1).run(None, {"input": x})[0]
    out = runtime.make_session(model, threads=1).run(None, {"input": x})[0]
    return float(np.mean((out - ref) ** 2))


@pytest.fixture(scope="module")
def resnet_runs():
    name = "resnet"
    calib = digits.feeds(name, "calib", batch=32, limit=CALIB)
    path = str(digits.trained_path(name))
    plain = pruning.prune(path, 0.3, round_to=8)
    ticks = []
    lsq = pruning.prune(path, 0.3, round_to=8, calibration=calib, reconstruct="lsq",
                        progress=lambda done, total: ticks.append((done, total)))
    lsq.ticks = ticks
    bn = pruning.prune(path, 0.3, round_to=8, calibration=calib, reconstruct="bn")
    return plain, lsq, bn


def test_progress_counts_every_feed_of_every_pass(resnet_runs):
    """Reconstruction reads the calibration data once per stage: the progress total says so up front
    and the count reaches it."""
    _, lsq, _ = resnet_runs
    feeds = len(digits.feeds("resnet", "calib", batch=32, limit=CALIB))
    passes = lsq.reconstruction["passes"]
    assert passes >= 2 and lsq.ticks
    assert {t for _, t in lsq.ticks} == {passes * feeds}
    assert [d for d, _ in lsq.ticks] == list(range(1, passes * feeds + 1))


def test_progress_of_the_data_criteria():
    calib = digits.feeds("mlp", "calib", batch=64, limit=CALIB)
    ticks = []
    pruning.prune(str(digits.trained_path("mlp")), 0.3, criterion="reconstruction", calibration=calib,
                  progress=lambda done, total: ticks.append((done, total)))
    assert ticks[-1] == (2 * len(calib), 2 * len(calib))  # activation statistics, then Gram matrices


def test_refit_reduces_every_layers_output_error(resnet_runs):
    _, lsq, _ = resnet_runs
    refit = lsq.reconstruction["refit"]
    assert len(refit) >= 6  # every conv that lost inputs, and the classifier
    for row in refit:
        assert row["mse_after"] < row["mse_before"], row
    assert sum(r["mse_after"] for r in refit) < 0.5 * sum(r["mse_before"] for r in refit)


def test_reconstruction_recovers_the_outputs(resnet_runs):
    plain, lsq, bn = resnet_runs
    errors = {k: _logit_error(r.model, "resnet") for k, r in (("plain", plain), ("lsq", lsq), ("bn", bn))}
    assert errors["lsq"] < 0.2 * errors["plain"], errors
    assert errors["bn"] < errors["plain"], errors
    assert _accuracy(lsq.model, "resnet") >= _accuracy(str(digits.trained_path("resnet")), "resnet") - 0.02
    assert bn.reconstruction["bn"] and not bn.reconstruction["refit"]


def test_refit_of_matmul_and_gemm_layers():
    calib = digits.feeds("mlp", "calib", batch=64, limit=CALIB * 2)
    result = pruning.prune(str(digits.trained_path("mlp")), 0.5, round_to=8, calibration=calib, reconstruct=True)
    refit = {r["layer"]: r for r in result.reconstruction["refit"]}
    assert refit and all(r["mse_after"] < r["mse_before"] for r in refit.values())
    plain = pruning.prune(str(digits.trained_path("mlp")), 0.5, round_to=8)
    assert _logit_error(result.model, "mlp") < _logit_error(plain.model, "mlp")


def test_reconstruction_needs_data():
    from onnxshrink.errors import ConfigError

    with pytest.raises(ConfigError, match="calibration data"):
        pruning.prune(str(digits.trained_path("mlp")), 0.3, reconstruct=True)


def test_prune_then_quantize(tmp_path):
    quantize = pytest.importorskip("onnxshrink.quantize")
    name = "resnet"
    calib = digits.feeds(name, "calib", batch=32, limit=CALIB)
    pruned = pruning.prune(str(digits.trained_path(name)), 0.3, round_to=8, calibration=calib, reconstruct=True)
    path = model_io.save(pruned.model, tmp_path / "pruned.onnx")
    result = quantize.quantize(path, calib, tmp_path / "pruned.int8.onnx")
    ops = result.after["ops"]
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    acc_float = _accuracy(str(path), name)
    acc_int8 = _accuracy(str(tmp_path / "pruned.int8.onnx"), name)
    assert acc_int8 >= acc_float - 0.02, (acc_float, acc_int8)


def _dead_channel_net() -> onnx.ModelProto:
    """Conv 3->16 (channels 0-7 all-zero weights and bias: dead after Relu) -> Conv 16->8 -> BN -> head,
    the BN with trained statistics of its own (not those of the data given below)."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    net (float[N,3,8,8] x) => (float[N,4] y) {
        a = Conv <pads = [1,1,1,1]> (x, w0, b0)
        ar = Relu (a)
        c = Conv <pads = [1,1,1,1]> (ar, w1, b1)
        n = BatchNormalization (c, g, beta, mean, var)
        nr = Relu (n)
        p = GlobalAveragePool (nr)
        f = Flatten (p)
        y = Gemm (f, wf, bf)
    }"""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    b0 = rng.standard_normal(16).astype(np.float32)
    w0[:8], b0[:8] = 0.0, 0.0
    arrays = {"w0": w0, "b0": b0, "w1": rng.standard_normal((8, 16, 3, 3)), "b1": rng.standard_normal(8),
              "g": rng.uniform(0.5, 1.5, 8), "beta": rng.standard_normal(8), "mean": rng.standard_normal(8),
              "var": rng.uniform(0.5, 4.0, 8), "wf": rng.standard_normal((8, 4)), "bf": rng.standard_normal(4)}
    for name, a in arrays.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(a, np.float32), name))
    return proto


def test_bn_reestimation_keeps_trained_statistics_where_pruning_changed_nothing():
    """Pruning the dead channels changes nothing; BN re-estimation on calibration data unlike the
    training data (here: shifted and scaled inputs) must leave the BN's trained statistics alone
    (it used to replace them with the calibration data's own, changing the model's outputs)."""
    proto = _dead_channel_net()
    rng = np.random.default_rng(1)
    calib = [{"x": (3 * rng.standard_normal((4, 3, 8, 8)) + 2).astype(np.float32)} for _ in range(3)]
    res = pruning.prune(proto, 0.5, round_to=8, calibration=calib, reconstruct="bn")
    assert res.reconstruction["bn"]  # the BN after the conv that lost inputs was re-estimated
    assert sum(len(g.remove) for g in res.plan.groups) == 8
    feed = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    want = runtime.make_session(proto.SerializeToString()).run(None, feed)[0]
    got = runtime.make_session(res.model).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _scaled_mlp_calibration(scale: float) -> list[dict]:
    calib = digits.feeds("mlp", "calib", batch=64, limit=128)
    top = float(np.finfo(np.float32).max)
    return [{k: np.clip(v.astype(np.float64) * scale, -top, top).astype(np.float32) for k, v in f.items()}
            for f in calib]


def test_refit_of_activations_whose_squares_overflow_float32():
    """Activations near 1e20 are finite, but their Gram products overflow float32: the sums are then
    taken in float64 and the refit still lowers every layer's error (it reported NaN and refit
    nothing before)."""
    result = pruning.prune(str(digits.trained_path("mlp")), 0.5, round_to=8, criterion="reconstruction",
                           calibration=_scaled_mlp_calibration(3e19), reconstruct=True)
    scores = [s for g in result.plan.groups if g.scores for s in g.scores]
    assert scores and np.isfinite(scores).all()
    refit = result.reconstruction["refit"]
    assert len(refit) == 2 and not result.reconstruction["skipped"]
    for row in refit:
        assert np.isfinite(row["mse_before"]) and row["mse_after"] < 0.1 * row["mse_before"], row


def test_refit_skips_layers_whose_activations_are_not_finite():
    """Inputs at float32's largest value overflow to Inf inside the model: each layer is skipped by
    name, its weights kept, and the reconstruction criterion falls back to weight magnitude (its
    solve of non-finite Gram matrices failed with 'SVD did not converge' on a deep net)."""
    calib = _scaled_mlp_calibration(1e39)
    result = pruning.prune(str(digits.trained_path("mlp")), 0.5, round_to=8, calibration=calib, reconstruct=True)
    plain = pruning.prune(str(digits.trained_path("mlp")), 0.5, round_to=8)
    # the reconstruction criterion scores by magnitude then (its Gram solve raised LinAlgError)
    by_data = pruning.prune(str(digits.trained_path("mlp")), 0.5, round_to=8, calibration=calib,
                            criterion="reconstruction")
    assert [g.remove for g in by_data.plan.groups] == \
        [g.remove for g in pruning.prune(str(digits.trained_path("mlp")), 0.5, round_to=8, criterion="l2").plan.groups]
    recon = result.reconstruction
    assert not recon["refit"] and len(recon["skipped"]) == 2
    assert all("not finite" in s and "weights kept" in s for s in recon["skipped"])
    x, _ = digits.model_input("mlp", "test")
    ours = runtime.make_session(result.model, threads=1).run(None, {"input": x})[0]
    ref = runtime.make_session(plain.model, threads=1).run(None, {"input": x})[0]
    np.testing.assert_array_equal(ours, ref)


def test_normal_equations_hold_no_second_gram_matrix():
    """The Gram matrix is features squared (1.2 GB at 12,288 inputs): accumulating a batch makes only
    its float32 product (half a float64 Gram), a solve only per-feature arrays (numpy's allocations,
    as tracemalloc sees them; LAPACK's own copy is outside). Before, a batch made a float64 copy of
    its product and a solve three Gram-sized temporaries (ridge diagonal, its scaling, the sum)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    d, k, rows = 900, 8, 64
    gram = (d + 1) ** 2 * 8
    ne = Normal()
    ne.halves = (Sums(), Sums())  # the Gram path (fewer rows than inputs would keep the rows)
    tracemalloc.start()
    try:
        for _ in range(3):
            x = rng.standard_normal((rows, d)).astype(np.float32)
            y = (x[:, :k] + 0.1 * rng.standard_normal((rows, k))).astype(np.float32)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            ne.add(x, y, np.arange(rows) % 2)
            add_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        ne.solve(1e-3, np.zeros((d + 1, k)))
        solve_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert add_peak < 0.6 * gram, add_peak / gram
    assert solve_peak < 0.25 * gram, solve_peak / gram
    sums = Sums()  # the ridge goes on the diagonal in place and comes off exactly
    sums.add(np.c_[x, np.ones(rows, np.float32)], y)
    before = sums.xtx.copy()
    sums.solve(0.5, True)
    assert np.array_equal(sums.xtx, before)


def _least_squares_data(rows: int, d: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d)).astype(np.float32)
    y = (x[:, :k] * 2 + 0.3 + 0.1 * rng.standard_normal((rows, k))).astype(np.float32)
    return x, y


def _ridge64(x1: np.ndarray, y: np.ndarray, ridge: float, fit_bias: bool) -> np.ndarray:
    """The ridge solution in float64 from the primal normal equations (the reference)."""
    a, b = x1.T.astype(np.float64) @ x1, x1.T.astype(np.float64) @ y
    f = x1.shape[1] - 1
    n = f + 1 if fit_bias else f
    lam = ridge * np.trace(a[:f, :f]) / f
    w = np.linalg.solve(a[:n, :n] + lam * np.diag(np.r_[np.ones(f), np.zeros(n - f)]), b[:n])
    return w if fit_bias else np.vstack([w, np.zeros((1, w.shape[1]))])


@pytest.mark.parametrize("fit_bias", [True, False])
def test_rows_solve_in_the_dual_as_the_gram_does(fit_bias):
    """Fewer rows than inputs: the kept rows give the ridge solution of the primal normal equations
    (the bias unpenalized, by centering), in float64: closer to it than the Gram's float32 products
    get (here 2e-4 of the largest weight at the small ridge), and the same squared errors."""
    x, y = _least_squares_data(40, 120, 3, 4)
    x1 = np.c_[x, np.ones(len(x), np.float32)]
    rows, sums = Rows(), Sums()
    for i in range(0, 40, 16):
        rows.add(x1[i:i + 16], y[i:i + 16])
        sums.add(x1[i:i + 16], y[i:i + 16])
    for ridge in (1e-3, 1.0):
        ref = _ridge64(x1, y, ridge, fit_bias)
        w_rows, w_sums = rows.solve(ridge, fit_bias), sums.solve(ridge, fit_bias)
        scale = np.abs(ref).max()
        assert np.abs(w_rows - ref).max() < 1e-9 * scale
        assert np.abs(w_sums - ref).max() < 1e-3 * scale
        # the Gram's error sum is y^T y - 2 w^T X^T y + w^T X^T X w, which cancels: equal within
        # y^T y's rounding
        assert abs(rows.sse(w_sums) - sums.sse(w_sums)) < 1e-6 * sums.yty
    assert rows.mse(w_rows) < 0.1 * rows.mse(np.zeros_like(w_rows))


def test_normal_keeps_rows_until_there_are_as_many_as_inputs():
    """A layer that sees few rows keeps them (and its decision and weights match the Gram path's);
    the batch that brings it to its input count turns it into Gram sums equal bit for bit to
    summing every batch there."""
    x, y = _least_squares_data(48, 60, 2, 5)
    fold = np.arange(16) % 2
    few, gram = Normal(), Normal()
    gram.halves = (Sums(), Sums())
    for i in range(0, 48, 16):
        few.add(x[i:i + 16], y[i:i + 16], fold)
        gram.add(x[i:i + 16], y[i:i + 16], fold)
    assert all(isinstance(h, Rows) for h in few.halves)
    w_few, before_few, after_few = few.solve(1e-3, np.zeros((61, 2)))
    w_gram, before_gram, after_gram = gram.solve(1e-3, np.zeros((61, 2)))
    assert few.ridge == gram.ridge is not None
    assert np.abs(w_few - w_gram).max() < 1e-3 * np.abs(w_gram).max()
    assert before_few == pytest.approx(before_gram, rel=1e-5)
    assert after_few == pytest.approx(after_gram, abs=1e-3 * before_gram)  # see the sse note above

    x, y = _least_squares_data(80, 60, 2, 6)
    grown, gram = Normal(), Normal()
    gram.halves = (Sums(), Sums())
    for i in range(0, 80, 16):
        grown.add(x[i:i + 16], y[i:i + 16], fold)
        gram.add(x[i:i + 16], y[i:i + 16], fold)
        assert isinstance(grown.halves[0], Rows) == (i + 16 < 61)
    for mine, theirs in zip(grown.halves, gram.halves):
        assert np.array_equal(mine.xtx, theirs.xtx) and np.array_equal(mine.xty, theirs.xty)
        assert mine.yty == theirs.yty and mine.rows == theirs.rows


def test_reconstruction_criterion_leaves_out_grams_past_its_limits(monkeypatch, caplog):
    """The reconstruction criterion holds every layer's Gram matrix at once: a group with a layer
    wider than ``MAX_GRAM_FEATURES``, or whose Grams would pass ``GRAM_BUDGET``, is scored without
    them (the diagonal form), with a warning naming the layer. Within the limits nothing changes."""
    from onnxshrink import depgraph, importance, importance_lsq

    model = model_io.load(str(digits.trained_path("cnn")))
    dg = depgraph.build(model)
    feeds = digits.feeds("cnn", "calib", limit=2)
    everything = importance_lsq.collect_grams(model, dg, feeds)
    widest = max(importance_lsq.gram_layers(dg), key=importance_lsq.feature_count)
    width = importance_lsq.feature_count(widest)
    assert width == 1024 and len(everything) == 5  # the Gemm after the flatten; 12 MiB in all

    monkeypatch.setattr(importance_lsq, "MAX_GRAM_FEATURES", width - 1)
    with caplog.at_level("WARNING", logger="onnxshrink.importance_lsq"):
        narrower = importance_lsq.collect_grams(model, dg, feeds)
    assert set(narrower) == set(everything) - {importance_lsq.layer_key(widest)}
    assert f"{importance_lsq.layer_key(widest)} has {width} inputs" in caplog.text
    for key, gram in narrower.items():
        np.testing.assert_array_equal(gram, everything[key])
    group = next(g for g in dg.groups if widest in [n for n, _ in importance_lsq.consumer_layers(g)])
    stats = importance.collect_stats(model, importance.stat_slots(dg), feeds)
    stats.grams = narrower
    assert importance_lsq.greedy_scores(group, narrower) is None
    diagonal = importance.get("reconstruction")(group, stats)  # scored all the same
    assert diagonal.shape == (group.width,) and np.isfinite(diagonal).all()

    monkeypatch.setattr(importance_lsq, "MAX_GRAM_FEATURES", 4096)
    monkeypatch.setattr(importance_lsq, "GRAM_BUDGET", sum(g.nbytes for g in everything.values()) - 1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnxshrink.importance_lsq"):
        budgeted = importance_lsq.collect_grams(model, dg, feeds)
    sizes = sum(g.nbytes for g in budgeted.values())
    assert 0 < len(budgeted) < len(everything) and sizes <= importance_lsq.GRAM_BUDGET
    assert "would take the total over" in caplog.text


def test_a_stage_over_its_memory_budget_is_refit_in_several_passes(monkeypatch):
    """The layers of a stage share one pass and hold their normal equations together; past
    ``STAGE_BUDGET`` the stage is split into passes (here one layer each), which read the same
    inputs: the same layers are refit, and the result is as good (rows are sampled per pass, so the
    weights differ a little)."""
    from onnxshrink import reconstruct

    name = "inception"
    calib = digits.feeds(name, "calib", batch=32, limit=CALIB)
    path = str(digits.trained_path(name))
    together = pruning.prune(path, 0.3, calibration=calib, reconstruct="lsq")
    monkeypatch.setattr(reconstruct, "STAGE_BUDGET", 1)
    apart = pruning.prune(path, 0.3, calibration=calib, reconstruct="lsq")
    one, split = together.reconstruction, apart.reconstruction
    layers = sorted(f["layer"] for f in one["refit"])
    assert sorted(f["layer"] for f in split["refit"]) == layers
    assert split["passes"] == one["passes"] + 6  # 9 refits in 3 stages, then in 9 passes
    before, after = _logit_error(together.model, name), _logit_error(apart.model, name)
    assert after < 1.2 * before, (before, after)


@pytest.mark.parametrize("name", digits.ALL)
def test_the_digits_nets_keep_every_gram_within_the_criterions_limits(name):
    """The limits of the reconstruction criterion leave the models it is measured on untouched: every
    consumer layer of every unblocked group gets its Gram (the widest, resnet_wide's, 1,153 inputs)."""
    from onnxshrink import depgraph, importance_lsq

    dg = depgraph.build(model_io.load(str(digits.trained_path(name))))
    every = {n for g in dg.groups if not g.blocked for n, _ in importance_lsq.consumer_layers(g)}
    taken = importance_lsq.gram_layers(dg)
    assert every and set(taken) == every
    assert sum(importance_lsq.gram_bytes(n) for n in taken) <= 18 << 20
    assert max(importance_lsq.feature_count(n) for n in taken) <= importance_lsq.MAX_GRAM_FEATURES
