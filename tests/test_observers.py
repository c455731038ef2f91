"""Observers and the growing histogram against hand-computed statistics."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink import histogram as H
from onnxshrink.errors import ConfigError
from onnxshrink.observers import (
    DEFAULT_BINS,
    EntropyObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MseObserver,
    Observer,
    PercentileObserver,
    make_observer,
    split_outliers,
)

RNG = np.random.default_rng(1234)


def feed(obs, x, chunks: int = 10):
    for part in np.array_split(np.asarray(x, dtype=np.float32), chunks):
        obs.update(part)
    return obs


def test_minmax_hand_computed():
    obs = MinMaxObserver()
    obs.update(np.array([[1.0, -2.0, 3.0]], np.float32))
    obs.update(np.array([0.5, 7.0], np.float32))
    obs.update(np.zeros((0, 3), np.float32))  # empty batches are ignored
    assert obs.range() == (-2.0, 7.0)
    assert (obs.count, obs.outliers) == (5, 0)
    assert isinstance(obs, Observer)


def test_ema_hand_computed():
    obs = MovingAverageMinMaxObserver(momentum=0.5)
    for batch in ([-1.0, 2.0], [-3.0, 4.0], [1.0, 1.0]):
        obs.update(np.array(batch, np.float32))
    # (-1, 2) -> (-2, 3) -> (-0.5, 2)
    assert obs.range() == pytest.approx((-0.5, 2.0))
    assert (obs.observed_min, obs.observed_max) == (-3.0, 4.0)


def test_percentile_on_uniform():
    x = RNG.random(1_000_000)
    lo, hi = feed(PercentileObserver(percentile=99.0), x).range()
    assert lo == pytest.approx(0.01, abs=2e-3) and hi == pytest.approx(0.99, abs=2e-3)
    lo, hi = feed(PercentileObserver(percentile=99.0, symmetric=True), 2 * x - 1).range()
    assert hi == pytest.approx(0.99, abs=2e-3) and lo == pytest.approx(-0.99, abs=2e-3)


def test_percentile_matches_numpy_on_normal():
    x = RNG.standard_normal(400_000).astype(np.float32)
    obs = feed(PercentileObserver(percentile=99.9), x)
    width = obs.hist.width
    assert obs.range()[1] == pytest.approx(np.percentile(x, 99.9), abs=2 * width)
    assert obs.range()[0] == pytest.approx(np.percentile(x, 0.1), abs=2 * width)


def test_histogram_grows_by_exact_merges():
    h = H.Histogram(16)
    h.add(np.arange(16, dtype=np.float32) + 0.5)  # one value per unit bin over [0.5, 15.5]
    assert h.lo == 0.5 and h.width == pytest.approx(15 / 16)
    before = h.counts.copy()
    h.add(np.array([40.0], np.float32))  # k = ceil(ceil(39.5 / w) / 16) = ceil(43 / 16) = 3
    assert h.width == pytest.approx(3 * 15 / 16) and h.lo == 0.5
    expected = np.add.reduceat(np.concatenate([before, np.zeros(32, np.int64)]), np.arange(0, 48, 3))
    expected[int((40.0 - 0.5) / h.width)] += 1  # bin 14
    np.testing.assert_array_equal(h.counts, expected)
    h.add(np.array([-10.0], np.float32))  # grows to the left by whole bins
    assert h.lo <= -10.0 and h.total == 18


def test_histogram_regrowth_keeps_total_and_matches_numpy():
    h = H.Histogram(256)
    parts = [RNG.normal(0, s, 5000).astype(np.float32) for s in (0.01, 0.1, 1.0, 5.0)]
    for p in parts:
        h.add(p)
    everything = np.concatenate(parts)
    assert h.total == everything.size
    assert h.lo <= everything.min() and h.hi >= everything.max()
    reference, _ = np.histogram(everything, bins=h.edges)
    assert np.abs(reference - h.counts).sum() <= 2  # only float rounding at bin edges may differ


def test_histogram_starts_on_constant_data():
    h = H.Histogram(64)
    h.add(np.zeros(10, np.float32))
    h.add(np.array([3.0], np.float32))
    assert h.total == 11 and h.lo <= 0 and h.hi >= 3


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "entropy", "mse"])
def test_outliers_excluded_and_counted(method):
    x = RNG.standard_normal(10_000).astype(np.float32)
    x[:50] = -1e9
    x[50:60] = np.finfo(np.float32).min
    x[60:62] = np.inf
    x[62] = np.nan
    obs = make_observer(method)
    obs.update(x)
    lo, hi = obs.range()
    assert -6 < lo < 0 < hi < 6
    assert obs.outliers == 63 and obs.count == 10_000


def test_all_outliers_leaves_no_range():
    obs = make_observer("entropy")
    obs.update(np.full(8, -1e9, np.float32))
    assert not obs.seen and obs.range() == (0.0, 0.0) and obs.outliers == 8


def test_split_outliers_threshold():
    vals, n, lo, hi = split_outliers(np.array([1e8, -1e8 + 1e3, 5.0], np.float64), 1e8)
    assert n == 1 and lo == pytest.approx(-1e8 + 1e3) and hi == 5.0 and vals.size == 2


def test_kl_cost_hand_computed():
    counts = np.array([4, 0, 2, 2, 1, 1], np.int64)
    # window [0, 4), 2 buckets: P = [4, 0, 2, 2 + 1 + 1], Q = [4, 0, 2, 2] (bucket sums spread on P's
    # non-empty bins); normalized P = [.4, .2, .4] and Q = [.5, .25, .25] on the non-empty bins
    expected = 0.4 * np.log(0.4 / 0.5) + 0.2 * np.log(0.2 / 0.25) + 0.4 * np.log(0.4 / 0.25)
    assert H.kl_cost(counts, 0, 4, 2) == pytest.approx(expected)
    assert H.kl_cost(counts, 0, 6, 6) == pytest.approx(0.0)  # one bucket per bin: nothing lost


@pytest.mark.parametrize("symmetric", [True, False])
def test_entropy_search_close_to_exhaustive(symmetric):
    x = RNG.laplace(0, 1, 200_000).astype(np.float32)
    x = np.abs(x) if symmetric else x
    obs = feed(EntropyObserver(symmetric=symmetric), x)
    edges, counts, zero = obs._grid()
    nq = obs._steps()
    lo, hi = obs.range()
    j = int(np.searchsorted(edges, hi - 1e-9))
    i = 0 if symmetric else int(np.searchsorted(edges, lo - 1e-9))
    ours = H.kl_cost(counts, i, j, nq)
    if symmetric:  # exhaustive, bin by bin (TensorRT's loop)
        best = min(H.kl_cost(counts, 0, jj, nq) for jj in range(nq, len(counts) + 1))
    else:  # exhaustive over the upper end with the lower end found
        best = min(H.kl_cost(counts, i, jj, nq) for jj in range(max(zero, i + nq), len(counts) + 1))
    assert ours <= best * 1.10 + 1e-5  # the KL curve is flat and jagged near its minimum
    assert 3 < hi < 12 and (lo == -hi if symmetric else -12 < lo < -3)


def test_entropy_clips_a_clear_outlier_tail():
    bulk = np.abs(RNG.standard_normal(200_000))
    x = np.concatenate([bulk, np.linspace(30, 50, 20)]).astype(np.float32)
    for symmetric in (False, True):
        hi = feed(EntropyObserver(symmetric=symmetric), x).range()[1]
        assert 2.5 < hi < 10, (symmetric, hi)
    assert feed(MinMaxObserver(), x).range()[1] == 50


def _fake_quant_mse(x: np.ndarray, a: float, b: float, steps: int) -> float:
    step = (b - a) / steps
    q = np.clip(np.round((np.clip(x, a, b) - a) / step), 0, steps) * step + a
    return float(np.mean((x - q) ** 2))


def test_mse_near_brute_force_optimum():
    x = np.abs(RNG.laplace(0, 1, 200_000)).astype(np.float32)
    obs = feed(MseObserver(), x)
    lo, hi = obs.range()
    assert lo == pytest.approx(0, abs=1e-3)
    grid = np.linspace(1.0, float(x.max()), 300)
    best = min(_fake_quant_mse(x, 0.0, b, 255) for b in grid)
    ours = _fake_quant_mse(x, 0.0, hi, 255)
    assert ours <= best * 1.05
    assert hi < 0.8 * x.max()  # the heavy tail is clipped
    assert ours < _fake_quant_mse(x, 0.0, float(x.max()), 255)


def test_mse_symmetric_and_asymmetric_windows_contain_the_bulk():
    x = np.concatenate([RNG.standard_normal(1_000_000), [25.0]]).astype(np.float32)
    lo, hi = feed(MseObserver(), x).range()
    assert -5 < lo < -2.5 and 2.5 < hi < 6  # one far outlier costs less clipped than kept
    lo, hi = feed(MseObserver(symmetric=True), x).range()
    assert lo == -hi and 2.5 < hi < 6


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_state_is_bounded_and_restorable(method):
    small, big = make_observer(method), make_observer(method)
    feed(small, RNG.standard_normal(1000), chunks=2)
    feed(big, RNG.standard_normal(1_000_000) * 3, chunks=200)
    assert small.state_nbytes() == big.state_nbytes() == DEFAULT_BINS * 8
    assert {k: v.shape for k, v in small.state().items()} == {k: v.shape for k, v in big.state().items()}
    copy = make_observer(method)
    copy.load_state(big.state())
    assert copy.range() == big.range() and copy.count == big.count


def test_minmax_state_is_constant_size():
    obs = MinMaxObserver()
    size = len(vars(obs))
    feed(obs, RNG.standard_normal(100_000), chunks=100)
    assert len(vars(obs)) == size and obs.state_nbytes() == 0


def test_constant_data_range_is_the_constant():
    obs = feed(MseObserver(), np.full(100, 3.0))
    assert obs.range() == (3.0, 3.0)


def test_make_observer_rejects_bad_options():
    with pytest.raises(ConfigError, match="unknown calibration method"):
        make_observer("kmeans")
    with pytest.raises(ConfigError, match="does not take"):
        make_observer("minmax", percentile=99)
    with pytest.raises(ConfigError, match="percentile"):
        make_observer("percentile", percentile=30)
    with pytest.raises(ConfigError, match="momentum"):
        make_observer("ema", momentum=1.5)
    with pytest.raises(ConfigError, match="bins"):
        make_observer("entropy", bins=10)
