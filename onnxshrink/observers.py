"""Observers: streaming statistics of one tensor that choose its int8 clipping range.

An observer takes batches with ``update(x)`` and answers ``range() -> (lo, hi)``. Its memory is O(1)
(min/max, moving average) or O(bins) (histograms) whatever the number of samples seen.

- ``MinMaxObserver``: the extremes seen.
- ``MovingAverageMinMaxObserver(momentum)``: ``r = momentum * r + (1 - momentum) * batch_extreme`` per
  ``update`` call (one call per calibration batch); the first call sets ``r``.
- ``PercentileObserver(percentile)``: the ``100 - p`` and ``p`` percentiles (of ``|x|`` when symmetric).
- ``EntropyObserver``: the window minimizing the KL divergence between the clipped histogram and its
  ``num_quantized_bins``-level quantization (TensorRT's entropy calibration).
- ``MseObserver``: the window minimizing the expected quantization MSE (clipping error outside,
  ``step**2 / 12`` inside).

Histogram observers keep ``bins`` counts whose range grows, with exact re-binning, when new data exceeds it
(see ``onnxshrink.histogram``). ``symmetric=True`` searches ``[-t, t]`` windows for int8 symmetric
activations (``num_quantized_bins`` then defaults to 254: levels -127..127) and returns ``(-t, t)``; the
default searches asymmetric windows containing 0 for uint8 (255 steps) and returns them clipped to the
observed extremes.

Outliers: values with ``|x| >= outlier_abs`` (default 1e8), and NaN, are excluded from every statistic and
counted in ``outliers``. They are constant-like fillers (attention masks of -1e9, float32-min -3.4e38, inf)
that would otherwise swamp the range of every tensor they touch; a tensor holding them should stay float
in a quantized model, which the count lets the quantizer see. ``count`` counts every element, outliers
included. ``range()`` of an observer that saw no usable value is ``(0.0, 0.0)``.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

from onnxshrink import histogram as H
from onnxshrink.errors import ConfigError

OUTLIER_ABS = 1e8
DEFAULT_BINS = 4096
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")


@runtime_checkable
class Observer(Protocol):
    def update(self, x: np.ndarray) -> None: ...

    def range(self) -> tuple[float, float]: ...


def split_outliers(x: np.ndarray, outlier_abs: float = OUTLIER_ABS):
    """``(values, n_outliers, vmin, vmax)``: the flat values with ``|x| < outlier_abs`` (NaN excluded),
    how many others there were, and the extremes of the values kept (None when none is kept)."""
    flat = np.asarray(x).reshape(-1)
    if flat.dtype != np.float32 and flat.dtype != np.float64:
        flat = flat.astype(np.float32)
    if flat.size == 0:
        return flat, 0, None, None
    vmin, vmax = flat.min(), flat.max()
    if -outlier_abs < vmin and vmax < outlier_abs:  # False for NaN: take the slow path
        return flat, 0, float(vmin), float(vmax)
    kept = flat[np.abs(flat) < outlier_abs]
    if kept.size == 0:
        return kept, flat.size, None, None
    return kept, flat.size - kept.size, float(kept.min()), float(kept.max())


class _Stats:
    """Counting and extremes shared by every observer; subclasses add ``_observe`` and ``range``."""

    #: Whether each batch's extremes are enough (``update_extremes``): calibration then reduces the
    #: tensors inside the graph instead of fetching them.
    accepts_extremes = True

    def __init__(self, outlier_abs: float = OUTLIER_ABS) -> None:
        if not outlier_abs > 0:
            raise ConfigError(f"outlier_abs must be > 0, got {outlier_abs}")
        self.outlier_abs = float(outlier_abs)
        self.count = 0
        self.outliers = 0
        self.observed_min = math.inf
        self.observed_max = -math.inf

    @property
    def seen(self) -> bool:
        """Whether any usable (non-outlier) value was observed."""
        return self.observed_min <= self.observed_max

    def update(self, x: np.ndarray) -> None:
        values, n_out, vmin, vmax = split_outliers(x, self.outlier_abs)
        self.count += int(np.size(x))
        self.outliers += n_out
        if vmin is None:
            return
        self.observed_min = min(self.observed_min, vmin)
        self.observed_max = max(self.observed_max, vmax)
        self._observe(values, vmin, vmax)

    def update_extremes(self, vmin: float, vmax: float, size: int, outliers: int = 0) -> None:
        """One batch seen only through its extremes (outliers already left out), for observers with
        ``accepts_extremes``; ``vmin > vmax`` means no usable value."""
        self.count += int(size)
        self.outliers += int(outliers)
        if not vmin <= vmax:
            return
        self.observed_min = min(self.observed_min, float(vmin))
        self.observed_max = max(self.observed_max, float(vmax))
        self._observe(None, float(vmin), float(vmax))

    def _observe(self, values: np.ndarray | None, vmin: float, vmax: float) -> None:
        pass

    def config(self) -> dict:
        """The options that decide the range (for cache keys and reports)."""
        return {"outlier_abs": self.outlier_abs}

    def state_nbytes(self) -> int:
        """Bytes of state held (independent of the number of samples)."""
        return 0


class MinMaxObserver(_Stats):
    """The extremes of every value seen."""

    def range(self) -> tuple[float, float]:
        return (self.observed_min, self.observed_max) if self.seen else (0.0, 0.0)


class MovingAverageMinMaxObserver(_Stats):
    """Exponential moving average of each batch's extremes (one step per ``update`` call)."""

    def __init__(self, momentum: float = 0.9, outlier_abs: float = OUTLIER_ABS) -> None:
        super().__init__(outlier_abs)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self._lo: float | None = None
        self._hi: float | None = None

    def _observe(self, values, vmin, vmax) -> None:
        if self._lo is None:
            self._lo, self._hi = vmin, vmax
            return
        m = self.momentum
        self._lo = m * self._lo + (1 - m) * vmin
        self._hi = m * self._hi + (1 - m) * vmax

    def range(self) -> tuple[float, float]:
        return (self._lo, self._hi) if self._lo is not None else (0.0, 0.0)

    def config(self) -> dict:
        return {**super().config(), "momentum": self.momentum}


class HistogramObserver(_Stats):
    """Base of the histogram observers: a growing ``Histogram`` plus the exact extremes."""

    accepts_extremes = False

    def __init__(self, bins: int = DEFAULT_BINS, symmetric: bool = False, outlier_abs: float = OUTLIER_ABS):
        super().__init__(outlier_abs)
        if int(bins) < 128:
            raise ConfigError(f"bins must be at least 128, got {bins}")
        self.hist = H.Histogram(int(bins))
        self.symmetric = bool(symmetric)

    def _observe(self, values, vmin, vmax) -> None:
        if values is None:
            raise TypeError(f"{type(self).__name__} needs the values, not only their extremes")
        self.hist.add(values, vmin, vmax)

    def config(self) -> dict:
        return {**super().config(), "bins": self.hist.bins, "symmetric": self.symmetric}

    def state_nbytes(self) -> int:
        return self.hist.counts.nbytes

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore this observer (histogram, extremes, counts) with ``load_state``."""
        h = self.hist
        return {
            "counts": h.counts.copy(),
            "scalars": np.array([h.lo, h.width, self.observed_min, self.observed_max], dtype=np.float64),
            "tallies": np.array([self.count, self.outliers], dtype=np.int64),
        }

    def load_state(self, state) -> None:
        counts = np.asarray(state["counts"], dtype=np.int64)
        if counts.shape != (self.hist.bins,):
            raise ValueError(f"state has {counts.shape} bins, this observer {self.hist.bins}")
        self.hist.counts = counts.copy()
        lo, width, omin, omax = (float(v) for v in state["scalars"])
        self.hist.lo, self.hist.width = lo, width
        self.observed_min, self.observed_max = omin, omax
        self.count, self.outliers = (int(v) for v in state["tallies"])

    def range(self) -> tuple[float, float]:
        if not self.seen:
            return (0.0, 0.0)
        if self.observed_min == self.observed_max:
            return (self.observed_min, self.observed_max)
        lo, hi = self._search()
        if self.symmetric:  # the window searched for int8 symmetric: [-t, t], t <= max |x|
            t = min(hi, max(-self.observed_min, self.observed_max))
            return (-t, t)
        return (max(lo, self.observed_min), min(hi, self.observed_max))

    def _grid(self):
        """``(edges, counts, zero_index)`` of the search grid: ``|x|`` over ``[0, max|x|]`` when
        symmetric, else the values over ``[min(lo, 0), max(hi, 0)]`` (0 lies on or next to an edge)."""
        n = self.hist.bins
        if self.symmetric:
            top = max(abs(self.observed_min), abs(self.observed_max))
            return np.linspace(0.0, top, n + 1), self.hist.abs_counts(top, n), 0
        lo, hi = min(self.observed_min, 0.0), max(self.observed_max, 0.0)
        edges = np.linspace(lo, hi, n + 1)
        zero = round(-lo / (hi - lo) * n)
        return edges, self.hist.resample(lo, hi, n), zero

    def _search(self) -> tuple[float, float]:
        raise NotImplementedError

    def _window(self, edges, i: int, j: int) -> tuple[float, float]:
        if self.symmetric:
            return (-float(edges[j]), float(edges[j]))
        return (float(edges[i]), float(edges[j]))


class PercentileObserver(HistogramObserver):
    """The ``100 - percentile`` and ``percentile`` percentiles (``[-t, t]`` of ``|x|`` when symmetric)."""

    def __init__(self, percentile: float = 99.999, bins: int = DEFAULT_BINS, symmetric: bool = False,
                 outlier_abs: float = OUTLIER_ABS):
        super().__init__(bins, symmetric, outlier_abs)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _search(self):
        q = self.percentile / 100.0
        if self.symmetric:
            edges, counts, _ = self._grid()
            t = H.quantile(edges, counts, q)
            return (-t, t)
        h = self.hist
        return (H.quantile(h.edges, h.counts, 1.0 - q), H.quantile(h.edges, h.counts, q))

    def config(self) -> dict:
        return {**super().config(), "percentile": self.percentile}


class _WindowObserver(HistogramObserver):
    def __init__(self, bins: int = DEFAULT_BINS, num_quantized_bins: int | None = None,
                 symmetric: bool = False, outlier_abs: float = OUTLIER_ABS):
        super().__init__(bins, symmetric, outlier_abs)
        nq = num_quantized_bins if num_quantized_bins is not None else (254 if symmetric else 255)
        if not 2 <= int(nq) <= int(bins) // 2:
            raise ConfigError(f"num_quantized_bins must be in [2, bins/2], got {nq}")
        self.num_quantized_bins = int(nq)

    def config(self) -> dict:
        return {**super().config(), "num_quantized_bins": self.num_quantized_bins}

    def _steps(self) -> int:
        """Quantization steps across the searched window (half the grid for ``|x|`` windows)."""
        return max(2, self.num_quantized_bins // 2) if self.symmetric else self.num_quantized_bins


class EntropyObserver(_WindowObserver):
    """KL-optimal clipping window (TensorRT entropy calibration) on the histogram."""

    def _search(self):
        edges, counts, zero = self._grid()
        i, j = H.kl_window(counts, zero, self._steps())
        return self._window(edges, i, j)


class MseObserver(_WindowObserver):
    """Clipping window minimizing the expected quantization MSE, from the histogram."""

    def _search(self):
        edges, counts, zero = self._grid()
        i, j = H.mse_window(counts, edges, zero, self._steps())
        return self._window(edges, i, j)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MseObserver,
}


def make_observer(method: str, **opts) -> _Stats:
    """A fresh observer for ``method`` (one of ``OBSERVERS``) with its options; ``ConfigError`` when the
    method or an option is unknown or out of range."""
    cls = OBSERVERS.get(method)
    if cls is None:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of {sorted(OBSERVERS)}")
    try:
        return cls(**opts)
    except TypeError as e:
        raise ConfigError(f"calibration method {method!r} does not take options {sorted(opts)}: {e}") from e
