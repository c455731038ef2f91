"""A growing fixed-bin histogram and the clipping-range searches run on it (percentile, KL, MSE).

``Histogram`` keeps ``bins`` counts over ``[lo, lo + bins * width]``. When new data falls outside, the range
grows by an integer factor ``k`` and a shift of whole old bins, so every old bin falls entirely inside one
new bin: the re-binning is an exact merge (no interpolation) and the total count never changes. Memory is
O(bins) whatever the amount of data; each growth at least doubles the width, so a tensor sees O(log) of them.

The searches take a histogram and return a clipping range:

- ``quantile``: the value below which a fraction of the counts lies (linear inside a bin);
- ``kl_window`` / ``mse_window``: the window ``[a, b]`` minimizing the KL divergence (TensorRT's entropy
  calibration) or the expected quantization MSE of a ``num_quantized_bins``-step uniform grid over it.
  Asymmetric (uint8) windows contain 0 and are searched by coordinate descent on both ends; symmetric (int8)
  windows ``[-t, t]`` are searched on the histogram of ``|x|``.
"""

from __future__ import annotations

import math

import numpy as np

#: Most window ends tried per 1-D search (evenly spread over the possible bin edges).
MAX_CANDIDATES = 160
#: Window ends tried per refinement level of the KL search (the KL cost is O(bins) per window).
REFINE_POINTS = 24
#: Probability given to a bin where P has mass and Q none (TensorRT's smoothing).
KL_EPS = 1e-4
#: Coordinate-descent rounds for asymmetric windows: upper end, lower end, upper end again.
DESCENT_ROUNDS = 2


class Histogram:
    """Counts of values in ``bins`` equal bins over ``[lo, hi]``; the range grows to hold new data."""

    def __init__(self, bins: int = 2048) -> None:
        if bins < 16:
            raise ValueError(f"a histogram needs at least 16 bins, got {bins}")
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.lo = 0.0
        self.width = 0.0  # 0 until the first data

    @property
    def hi(self) -> float:
        return self.lo + self.bins * self.width

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1, dtype=np.float64)

    def add(self, values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> None:
        """Count finite ``values`` (``vmin``/``vmax``: their extremes when already known)."""
        if values.size == 0:
            return
        vmin = float(values.min()) if vmin is None else float(vmin)
        vmax = float(values.max()) if vmax is None else float(vmax)
        if self.width == 0.0:
            self._start(vmin, vmax)
        elif vmin < self.lo or vmax > self.hi:
            self._grow(vmin, vmax)
        # float32 arithmetic keeps temporaries small; float64 when lo is far from 0 in bin widths
        ft = np.float32 if abs(self.lo) < self.width * 2.0**18 else np.float64
        scaled = (values.astype(ft, copy=False) - ft(self.lo)) * ft(1.0 / self.width)
        idx = np.clip(scaled, 0, self.bins - 1).astype(np.intp)
        self.counts += np.bincount(idx.reshape(-1), minlength=self.bins)

    def _start(self, vmin: float, vmax: float) -> None:
        span = vmax - vmin
        if span <= 0.0:  # constant so far: a tiny range around it, grown later if needed
            span = max(abs(vmin), 1.0) * 1e-6
            vmin -= span / 2
        self.lo = vmin
        self.width = span / self.bins

    def _grow(self, vmin: float, vmax: float) -> None:
        """Widen by an integer factor ``k`` and a shift of ``below`` old bins; merge counts exactly."""
        w = self.width
        below = max(0, math.ceil((self.lo - vmin) / w))
        end = max(self.bins, math.ceil((vmax - self.lo) / w))
        k = max(2, math.ceil((below + end) / self.bins))
        merged = np.zeros(self.bins, dtype=np.int64)
        np.add.at(merged, (np.arange(self.bins) + below) // k, self.counts)
        self.counts = merged
        self.lo -= below * w
        self.width = w * k

    def cdf(self, x: np.ndarray | float) -> np.ndarray:
        """Counts at or below ``x``, uniform inside each bin."""
        cum = np.concatenate([[0.0], np.cumsum(self.counts, dtype=np.float64)])
        return np.interp(x, self.edges, cum)

    def resample(self, lo: float, hi: float, bins: int) -> np.ndarray:
        """Float counts over ``bins`` equal bins of ``[lo, hi]`` (values outside are dropped)."""
        return np.diff(self.cdf(np.linspace(lo, hi, bins + 1)))

    def abs_counts(self, top: float, bins: int) -> np.ndarray:
        """Float counts of ``|x|`` over ``bins`` equal bins of ``[0, top]``."""
        t = np.linspace(0.0, top, bins + 1)
        inside = self.cdf(t) - self.cdf(-t)
        inside[0] = 0.0
        return np.diff(inside)


def quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The value with a fraction ``q`` of ``counts`` at or below it (linear inside the bin)."""
    cum = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    target = q * cum[-1]
    i = int(np.clip(np.searchsorted(cum, target, side="left"), 1, len(cum) - 1))
    c0, c1 = cum[i - 1], cum[i]
    frac = (target - c0) / (c1 - c0) if c1 > c0 else 1.0
    return float(edges[i - 1] + frac * (edges[i] - edges[i - 1]))


def _candidates(first: int, last: int, n: int = MAX_CANDIDATES) -> np.ndarray:
    """At most ``n`` integer positions spread evenly over ``[first, last]``."""
    if last <= first:
        return np.array([last], dtype=np.intp)
    n = min(n, last - first + 1)
    return np.unique(np.linspace(first, last, n).round().astype(np.intp))


def kl_cost(counts: np.ndarray, i: int, j: int, nq: int) -> float:
    """KL(P || Q) of the window of bins ``[i, j)``: P clips the tails into the edge bins, Q merges the
    window (without the tails) into ``nq`` quantization buckets and spreads each over its non-empty bins."""
    sliced = counts[i:j]
    p = sliced.astype(np.float64)
    p[0] += counts[:i].sum()
    p[-1] += counts[j:].sum()
    n = j - i
    bucket = (np.arange(n) * nq) // n
    nonzero = p > 0
    qsum = np.bincount(bucket, weights=sliced, minlength=nq)
    qnz = np.bincount(bucket, weights=nonzero, minlength=nq)
    q = np.where(nonzero, qsum[bucket] / np.maximum(qnz[bucket], 1.0), 0.0)
    ptot, qtot = p.sum(), q.sum()
    if ptot <= 0:
        return 0.0
    if qtot <= 0:
        return math.inf
    pn = p[nonzero] / ptot
    qn = q[nonzero] / qtot
    empty = qn == 0  # clipped mass where Q has none: smoothed like TensorRT (eps per empty bin)
    if empty.any():
        qn = (qn + KL_EPS * empty) / (1.0 + KL_EPS * empty.sum())
    return float(np.sum(pn * np.log(pn / qn)))


def _best(cost, first: int, last: int) -> int:
    """Argmin of ``cost(k)`` over integers ``[first, last]`` by successive refinement: ``REFINE_POINTS``
    evenly spread candidates, then as many between the best one's neighbours, down to single steps."""
    lo, hi = first, last
    while True:
        cands = _candidates(lo, hi, REFINE_POINTS)
        k = int(cands[np.argmin([cost(int(c)) for c in cands])])
        step = int(np.max(np.diff(cands))) if len(cands) > 1 else 1
        if step <= 1:
            return k
        lo, hi = max(first, k - step + 1), min(last, k + step - 1)


def kl_window(counts: np.ndarray, zero: int, nq: int) -> tuple[int, int]:
    """Bin-index window ``[i, j)`` with ``i <= zero <= j`` and at least ``nq`` bins minimizing ``kl_cost``."""
    n = len(counts)
    if n <= nq:
        return 0, n
    i, j = 0, n
    for round_ in range(DESCENT_ROUNDS):
        j = _best(lambda c, i=i: kl_cost(counts, i, c, nq), max(zero, i + nq), n)
        if zero == 0 or round_ == DESCENT_ROUNDS - 1:
            break
        i = _best(lambda c, j=j: kl_cost(counts, c, j, nq), 0, min(zero, j - nq))
    return i, j


def mse_window(counts: np.ndarray, edges: np.ndarray, zero: int, nq: int, min_bins: int = 8):
    """Bin-index window ``[i, j)`` minimizing the expected squared error of a uniform ``nq``-step grid
    over it: values outside clip to the nearest end, values inside cost ``step**2 / 12``."""
    n = len(counts)
    c = counts.astype(np.float64)
    ctr = (edges[:-1] + edges[1:]) / 2
    # prefix sums P[k] = sum over bins < k of c, c*ctr, c*ctr**2
    p0 = np.concatenate([[0.0], np.cumsum(c)])
    p1 = np.concatenate([[0.0], np.cumsum(c * ctr)])
    p2 = np.concatenate([[0.0], np.cumsum(c * ctr * ctr)])
    total = p0[-1]

    def cost(ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
        a, b = edges[ii], edges[jj]
        below = p2[ii] - 2 * a * p1[ii] + a * a * p0[ii]
        s0, s1, s2 = total - p0[jj], p1[-1] - p1[jj], p2[-1] - p2[jj]
        above = s2 - 2 * b * s1 + b * b * s0
        inside = p0[jj] - p0[ii]
        step = (b - a) / nq
        return np.maximum(below, 0) + np.maximum(above, 0) + inside * step * step / 12

    if n <= min_bins:
        return 0, n
    i, j = 0, n
    for _ in range(DESCENT_ROUNDS + 1):
        js = np.arange(max(zero, i + min_bins), n + 1)
        j = int(js[np.argmin(cost(np.full_like(js, i), js))])
        if zero == 0:
            break
        iis = np.arange(0, min(zero, j - min_bins) + 1)
        i = int(iis[np.argmin(cost(iis, np.full_like(iis, j)))])
    return i, j
