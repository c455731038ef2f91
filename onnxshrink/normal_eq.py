"""Streaming least squares for the refit of a layer (``onnxshrink.reconstruct``): normal equations
accumulated over calibration batches, split into two halves by sample for 2-fold cross-validation,
and ridge solutions. Memory is bounded by the layer's size, not the data's: a ``Sums`` holds
``X^T X`` (features squared) and ``X^T Y``, never the rows; while a layer has seen fewer rows than
it has inputs, a ``Rows`` keeps the rows instead (smaller then, and solved in the dual).
"""

from __future__ import annotations

import contextlib

import numpy as np


def one_blas_thread():
    """Small Gram products run far faster on one BLAS thread than on a contended pool (measured: 0.5
    vs 13 ms for 4096x97 on a loaded 2-core machine); threadpoolctl is used when installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(1)


def products(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``a^T b`` (``a^T a`` without ``b``): float32 products (fast), or float64 ones where those
    overflowed (activations near 1e20); still not finite means an Inf or NaN input. The float32
    result is returned as is (half the memory of a float64 copy); callers sum it into float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.T @ (a.copy() if b is None else b)  # a copy: gemm, not syrk
        # finite iff its float64 sum is (no float32 sum of finite values reaches 1e308); unlike
        # ``isfinite(out).all()`` it makes no boolean array of the Gram's size
        if not np.isfinite(np.sum(out, dtype=np.float64)):
            a64 = a.astype(np.float64)
            out = a64.T @ (a64 if b is None else b.astype(np.float64))
    return out


class Sums:
    """Streaming normal equations: X^T X, X^T Y and Y^T Y (float64) of the rows added.

    Memory: ``X^T X`` is features squared (a layer of 12,288 inputs: 1.2 GB in float64), so no second
    float64 array of that size is made here; LAPACK's solver copies its input into one. Each batch's
    float32 products are summed in place, and a solve adds the ridge to the diagonal in place and
    restores it after (from a copy of the diagonal, so the sums come back bit for bit)."""

    def __init__(self) -> None:
        self.xtx = self.xty = None
        self.yty = 0.0
        self.rows = 0

    def finite(self) -> bool:
        return self.xtx is None or bool(np.isfinite(self.xtx).all() and np.isfinite(self.xty).all()
                                        and np.isfinite(self.yty))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Accumulate rows (float32 products, float64 sums); ``x`` already has its ones column."""
        if not len(x):
            return
        for name, prod in (("xtx", products(x)), ("xty", products(x, y))):
            if getattr(self, name) is None:
                setattr(self, name, prod.astype(np.float64))
            else:
                np.add(getattr(self, name), prod, out=getattr(self, name))
            del prod
        with np.errstate(over="ignore", invalid="ignore"):
            self.yty += float((y.astype(np.float64) ** 2).sum())
        self.rows += len(x)

    def absorb(self, other: Sums) -> Sums:
        """Add ``other``'s sums into this one's, in place (no third Gram matrix); returns ``self``."""
        self.xtx += other.xtx
        self.xty += other.xty
        self.yty += other.yty
        self.rows += other.rows
        return self

    def solve(self, ridge: float, fit_bias: bool) -> np.ndarray:
        """Ridge solution (ridge relative to the mean feature energy; bias row 0 unless ``fit_bias``)."""
        n = self.xtx.shape[0] if fit_bias else self.xtx.shape[0] - 1
        a, b = self.xtx[:n, :n], self.xty[:n]
        f = self.xtx.shape[0] - 1
        lam = ridge * max(float(np.trace(self.xtx[:f, :f])) / max(f, 1), 1e-12)
        idx = np.arange(f)  # the ridge goes on the features' diagonal, not on the bias
        saved = self.xtx[idx, idx]
        self.xtx[idx, idx] += lam
        try:
            w = np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            w = np.linalg.lstsq(a, b, rcond=None)[0]
        finally:
            self.xtx[idx, idx] = saved
        return w if fit_bias else np.vstack([w, np.zeros((1, w.shape[1]))])

    def sse(self, w: np.ndarray) -> float:
        return max(self.yty - 2 * float((w * self.xty).sum()) + float((w * (self.xtx @ w)).sum()), 0.0)

    @property
    def size(self) -> int:
        """Rows times outputs: what the squared error is averaged over."""
        return max(self.rows * self.xty.shape[1], 1)

    def mse(self, w: np.ndarray) -> float:
        return self.sse(w) / self.size


class Rows:
    """The rows themselves, kept while a layer has seen fewer rows than it has inputs: a solve then
    works on the rows x rows kernel matrix ``X X^T`` (the dual of ridge regression), not on the
    features-squared Gram. The same solutions as ``Sums`` (up to rounding): the unpenalized bias is
    handled by centering, ``w = Xc^T (Xc Xc^T + lam I)^-1 Yc`` and ``bias = mean(y) - mean(x) w``.
    A layer of 8,608 inputs seen on 32 rows took about 3 minutes of LU solves per refit with the
    Gram (one-off measurement); its kernel matrix is 32 x 32. ``to_sums`` replays the rows, in order, into a ``Sums`` (bit for bit
    what adding them there directly gives) once there are as many rows as inputs."""

    def __init__(self) -> None:
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.rows = 0
        self._kernel: tuple | None = None  # (fit_bias, centered parts): the same for every ridge

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Keep a batch's rows; ``x`` already has its ones column."""
        if len(x):
            self.xs.append(x)
            self.ys.append(y)
            self.rows += len(x)
            self._kernel = None

    def to_sums(self) -> Sums:
        out = Sums()
        while self.xs:
            out.add(self.xs.pop(0), self.ys.pop(0))
        return out

    def finite(self) -> bool:
        return all(np.isfinite(a).all() for a in self.xs + self.ys)

    def absorb(self, other: Rows) -> Rows:
        self.xs += other.xs
        self.ys += other.ys
        self.rows += other.rows
        self._kernel = None
        return self

    def _stacked(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate(self.xs).astype(np.float64), np.concatenate(self.ys).astype(np.float64))

    def _centered(self, fit_bias: bool) -> tuple:
        """The rows centered (for a fitted bias), their means, the features' energy and ``Xc Xc^T``:
        computed once for every ridge tried."""
        if self._kernel is None or self._kernel[0] != fit_bias:
            x, y = self._stacked()
            x = x[:, :-1]  # the ones column: the bias is handled by centering
            energy = float((x * x).sum())
            mx, my = (x.mean(0), y.mean(0)) if fit_bias else (np.zeros(x.shape[1]), np.zeros(y.shape[1]))
            x -= mx
            y -= my
            self._kernel = (fit_bias, (x, y, mx, my, energy, x @ x.T))
        return self._kernel[1]

    def solve(self, ridge: float, fit_bias: bool) -> np.ndarray:
        """The ridge solution ``Sums.solve`` gives for the same rows (bias row 0 unless ``fit_bias``)."""
        x, y, mx, my, energy, gram = self._centered(fit_bias)
        lam = ridge * max(energy / max(x.shape[1], 1), 1e-12)
        kernel = gram.copy()
        kernel[np.diag_indices_from(kernel)] += lam
        try:
            alpha = np.linalg.solve(kernel, y)
        except np.linalg.LinAlgError:
            alpha = np.linalg.lstsq(kernel, y, rcond=None)[0]
        w = x.T @ alpha
        return np.vstack([w, (my - mx @ w)[None]])

    def sse(self, w: np.ndarray) -> float:
        x, y = self._stacked()
        return float(((x @ w - y) ** 2).sum())

    @property
    def size(self) -> int:
        return max(self.rows * self.ys[0].shape[1], 1) if self.ys else 1

    def mse(self, w: np.ndarray) -> float:
        return self.sse(w) / self.size


class Normal:
    """Streaming normal equations of one layer, samples dealt alternately into two halves (all rows
    of one sample to one half), so a refit can be judged on held-out samples (2-fold
    cross-validation): ``RIDGE_STEPS`` multiples of the given ridge are tried, and the layer keeps its
    current weights when none predicts the held-out samples better (a layer with about as many inputs
    as rows, like a squeeze-excite layer that sees one row per image, would otherwise fit the
    calibration data exactly and generalize badly).

    Folds were alternate rows before. Rows are patch positions in order, so with an even output
    width one fold held every even column and the other every odd one: on openWakeWord's embedding
    model (``oww_embedding``) that rejected 14 of its 16 refits in a one-off run;
    ``tests/test_reconstruct.py`` checks that all 16 are taken and each halves its layer's error."""

    RIDGE_STEPS = (1.0, 10.0, 100.0, 1000.0)
    #: Larger ridges are tried only below this many rows per input feature. With more rows the given
    #: (small) ridge is kept: the fit is well determined (``prune.md`` has this rule's figures).
    FEW_ROWS_PER_FEATURE = 8

    def __init__(self) -> None:
        self.halves: tuple = (Rows(), Rows())  # Sums once there are as many rows as inputs
        self.rows = 0
        self.ridge: float | None = None  # chosen by the last solve; None: current weights kept

    def add(self, x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> None:
        """Accumulate one batch; ``fold[i]`` (0 or 1) is the half of row ``i``'s sample."""
        x = np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)
        if isinstance(self.halves[0], Rows) and self.rows + len(x) >= x.shape[1]:
            self.halves = tuple(h.to_sums() for h in self.halves)
        for k, half in enumerate(self.halves):
            rows = fold == k
            if rows.any():
                half.add(x[rows], y[rows])
        self.rows += len(x)

    def finite(self) -> bool:
        """Whether every accumulated sum is finite (an activation that overflowed to Inf, or a NaN,
        makes them not, and no solution is then worth writing)."""
        return all(h.finite() for h in self.halves)

    def solve(self, ridge: float, w0: np.ndarray, fit_bias: bool = True) -> tuple[np.ndarray, float, float]:
        """The weights to use (``w0`` when no ridge beats it on held-out rows) and the mean squared
        errors of ``w0`` and of them on all rows."""
        a, b = self.halves
        width = w0.shape[0]  # inputs and the bias: the Gram's side
        self.halves = None  # solved once: the halves are merged into the total below
        if not a.rows:
            a, b = b, a
        held = None
        if b.rows:
            few = a.rows + b.rows < self.FEW_ROWS_PER_FEATURE * width
            held = {r * ridge: (b.sse(a.solve(r * ridge, fit_bias)) + a.sse(b.solve(r * ridge, fit_bias)))
                    for r in (self.RIDGE_STEPS if few else self.RIDGE_STEPS[:1])}
        total = a.absorb(b) if b.rows else a
        del b
        sse0 = total.sse(w0)
        before = sse0 / total.size
        self.ridge = ridge
        if held is not None:
            self.ridge = min(held, key=held.get)
            if held[self.ridge] >= sse0:
                self.ridge = None
                return w0, before, before
        w = total.solve(self.ridge, fit_bias)
        return w, before, total.mse(w)
