"""Calibration: run data through a model once and pick a clipping range for each tapped tensor.

``calibrate(model, data)`` taps the tensors (``onnxshrink.calib_taps``: a clone of the model whose outputs
are the taps), opens one ONNX Runtime session, streams the data in batches (``onnxshrink.calib_runner``)
into one observer per tensor (``onnxshrink.observers``) and returns a frozen ``CalibrationTable`` keyed by
value name. Memory does not grow with the number of samples: the runner holds one batch, an observer
O(bins). ``minmax`` and ``ema`` reduce every tensor inside the graph (``onnxshrink.calib_reduce``), so
their peak is about that of plain inference; the histogram methods fetch one batch of tensors at a time.

What is tapped (for quantizers): by default every float tensor that is an input or output of a node, in
the main graph and inside ``If`` branches and ``Loop``/``Scan`` bodies (lifted out, see ``calib_taps``),
except initializers and Constant outputs. A value inside a subgraph has its range under its own name; a
branch never taken leaves it in ``CalibrationTable.unobserved``; values inside model-local functions are
not tapped. If ONNX Runtime refuses the loop-body taps (a loop value whose shape changes between
iterations), calibration runs again without loop bodies and lists those tensors as unobserved.

Order of work: options, model and data source are checked first; then the on-disk cache is consulted;
then every feed is validated (names, dtypes, shapes, empty, NaN/Inf raise ``DataError``) before the model
runs at all.

Cache (``cache_dir``, default ``~/.cache/onnxshrink/calib``; ``False`` turns it off): the table is stored
as JSON under a key of the model fingerprint (graph structure and initializer bytes, hashed streaming;
external tensors by file, offset, length and file stat), the data fingerprint (``FeedSource.fingerprint``),
the tensor set, method, observer options, batch size, providers and channel-mean tensors. Histogram
methods also store every tensor's histogram in an ``.npz`` under a key without the method, so trying
``percentile``/``entropy``/``mse`` (or ``minmax``) on the same data and tensors does not run the model again.

Safe fallbacks, each noted in ``TensorRange.note``: a tensor with a constant value ``c`` gets
``[min(c, 0), max(c, 0)]``; any range whose span including 0 is below ``MIN_SPAN`` is widened to it (never a
zero scale); a tensor whose every value was an outlier (``|x| >= outlier_abs``, see ``observers``) gets
``[0, MIN_SPAN]`` and should stay float, as should any tensor with ``outliers > 0`` (a mask).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxshrink import calib_taps, model_io, runtime
from onnxshrink import data as data_mod
from onnxshrink.calib_cache import FORMAT, CacheKeys, CalibCache
from onnxshrink.calib_fingerprint import model_fingerprint
from onnxshrink.calib_runner import Reduced, TapRunner
from onnxshrink.errors import ConfigError, RuntimeFailure
from onnxshrink.observers import (
    HISTOGRAM_METHODS,
    OBSERVERS,
    HistogramObserver,
    make_observer,
)
from onnxshrink.progress import make_progress
from onnxshrink.report import write_json

logger = logging.getLogger(__name__)

#: The smallest span (with 0 included) a calibrated range may have.
MIN_SPAN = 1e-6


@dataclasses.dataclass(frozen=True)
class TensorRange:
    """The clipping range chosen for one tensor. ``count`` counts every element seen, the ``outliers``
    (excluded from the range) included; ``channel_mean`` is the per-channel mean along axis 1 when asked."""

    name: str
    min: float
    max: float
    observed_min: float
    observed_max: float
    count: int
    outliers: int = 0
    channel_mean: tuple[float, ...] | None = None
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class CalibrationTable:
    """Ranges keyed by ``ir.Value`` name (``table[value]`` and ``value in table`` take a value too)."""

    ranges: Mapping[str, TensorRange]
    method: str
    model_fingerprint: str
    data_fingerprint: str
    samples: int
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    unobserved: tuple[str, ...] = ()

    def __getitem__(self, key: str | ir.Value) -> TensorRange:
        name = key.name if isinstance(key, ir.Value) else key
        try:
            return self.ranges[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} has no calibrated range") from None

    def __contains__(self, key) -> bool:
        return (key.name if isinstance(key, ir.Value) else key) in self.ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __iter__(self):
        return iter(self.ranges)

    def get(self, key, default=None) -> TensorRange | None:
        return self.ranges.get(key.name if isinstance(key, ir.Value) else key, default)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "method": self.method, "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint, "samples": self.samples,
            "options": dict(self.options), "unobserved": list(self.unobserved),
            "ranges": [dataclasses.asdict(r) for r in self.ranges.values()],
        }

    def to_json(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping) -> CalibrationTable:
        if d.get("format") != FORMAT:
            raise ConfigError(f"calibration table format {d.get('format')!r} is not {FORMAT}")
        ranges = {}
        for r in d["ranges"]:
            cm = r.get("channel_mean")
            ranges[r["name"]] = TensorRange(**{**r, "channel_mean": tuple(cm) if cm is not None else None})
        return cls(ranges, d["method"], d["model_fingerprint"], d["data_fingerprint"], int(d["samples"]),
                   dict(d.get("options", {})), tuple(d.get("unobserved", ())))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CalibrationTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a readable calibration table: {e}") from e


@dataclasses.dataclass
class _Observed:
    """What one calibration run (or the caches) gave: the table itself when the table cache answered,
    else the observers of ``names`` (``planned``: the taps asked for; fewer after a loop-tap fallback)."""

    key: CacheKeys
    planned: tuple[str, ...]
    names: tuple[str, ...] = ()
    observers: list | None = None
    cmeans: dict = dataclasses.field(default_factory=dict)
    samples: int = 0
    table: CalibrationTable | None = None

    def to_table(self, cache: CalibCache) -> CalibrationTable:
        if self.table is None:
            not_run = [n for n in self.planned if n not in self.names]
            self.table = _build_table(self.names, self.observers, self.cmeans, self.key, self.samples, not_run)
            cache.save_table(self.key, self.table.to_dict())
        return self.table


def calibrate(
    model: ir.Model | str | Path,
    data,
    tensors: Sequence[ir.Value | str] | None = None,
    *,
    method: str = "minmax",
    batch_size: int = 8,
    providers=None,
    cache_dir: str | os.PathLike | None | bool = None,
    channel_means: Sequence[str] = (),
    progress: bool | Callable = True,
    **observer_opts,
) -> CalibrationTable:
    """Calibrate ``tensors`` of ``model`` (default: every float node input/output that is not a constant)
    on ``data`` (see ``onnxshrink.data.feeds``) with observer ``method`` (``minmax``, ``ema``,
    ``percentile``, ``entropy``, ``mse``) and its ``observer_opts`` (``onnxshrink.observers``).

    ``tensors``: ``ir.Value`` objects of ``model`` (an ``ir.Model``) or value names. ``batch_size``: feeds
    per run at most (stacked on axis 0, see ``calib_runner``). ``channel_means``: tensor names whose
    per-channel mean along axis 1 goes into ``TensorRange.channel_mean``. ``progress``: a bar on stderr,
    a callable ``fn(done, total)``, or False. ``cache_dir``: see the module docstring.
    Raises ``ConfigError`` (options, tensors), ``DataError`` (feeds, before any run) and
    ``RuntimeFailure`` (ONNX Runtime could not load or run the tap model).
    """
    observed = _observe(model, data, tensors, method=method, batch_size=batch_size, providers=providers,
                        cache_dir=cache_dir, channel_means=channel_means, progress=progress, **observer_opts)
    return observed.to_table(CalibCache(cache_dir))


def _observe(model, data, tensors=None, *, method: str = "minmax", batch_size: int = 8, providers=None,
             cache_dir=None, channel_means: Sequence[str] = (), progress: bool | Callable = True,
             **observer_opts) -> _Observed:
    """The shared collect step of ``calibrate`` and ``calibrate_methods``: validate, then answer from the
    table cache, the histogram cache or one run of the data through the tap model."""
    options = make_observer(method, **observer_opts).config()
    tensors = list(tensors) if tensors is not None else None
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if not isinstance(model, ir.Model) and any(isinstance(t, ir.Value) for t in tensors or ()):
        raise ConfigError("pass tensor names (not ir.Value) when the model is given as a path")
    ir_model = model_io.load(model)
    source = data_mod.feeds(data, ir_model)
    means = tuple(sorted({channel_means} if isinstance(channel_means, str) else set(channel_means)))
    replan = functools.partial(calib_taps.plan_taps, ir_model, tensors, channel_means=means,
                               outlier_abs=options["outlier_abs"],
                               reduce=OBSERVERS[method].accepts_extremes)
    plan = replan()
    key = CacheKeys(model_fingerprint(ir_model), source.fingerprint(), plan.names, method, options,
                    int(batch_size), runtime.resolve_providers(providers), means)
    planned = tuple(plan.names)
    if not planned:  # nothing to observe (a model with nothing to quantize): no run, nothing cached
        return _Observed(key, planned, (), [], {}, 0, _build_table((), (), {}, key, 0))
    cache = CalibCache(cache_dir)
    table = _cached_table(cache, key)
    if table is not None:
        return _Observed(key, planned, table=table)
    names = plan.names
    observers, cmeans, samples = _from_histograms(cache.load_hist(key), key, observer_opts)
    if observers is None:
        run = functools.partial(_collect, source=source, key=key, observer_opts=observer_opts,
                                providers=providers, progress=progress)
        names, observers, cmeans, samples = _run_with_fallback(run, plan, replan, tensors is None)
        if method in HISTOGRAM_METHODS:
            cache.save_hist(key, names, observers, cmeans, samples)
    return _Observed(key, planned, tuple(names), observers, cmeans, samples)


def calibrate_methods(model, data, tensors=None, *, methods: Sequence[str] = ("minmax", "percentile"),
                      **kwargs) -> dict[str, CalibrationTable]:
    """One table per method of ``methods`` from ONE run of the data: the first histogram method collects
    histograms (which also hold the exact extremes), the other methods are answered from its observers in
    memory (or from the on-disk cache; a method with observer options of its own cannot be, pass it alone).
    ``kwargs`` as for ``calibrate`` (no observer options)."""
    hist = [m for m in methods if m in HISTOGRAM_METHODS]
    if not hist:
        return {m: calibrate(model, data, tensors, method=m, **kwargs) for m in methods}
    ir_model = model_io.load(model)
    cache = CalibCache(kwargs.get("cache_dir"))
    first = _observe(ir_model, data, tensors, method=hist[0], **kwargs)
    tables = {hist[0]: first.to_table(cache)}
    # Other methods reuse the observers when this call ran (or rebuilt) them for every planned tap; a
    # table from the table cache, or a run that fell back to fewer taps, leaves them to their own call
    # (which the histogram cache usually answers without running the model).
    reuse = first.observers is not None and first.names == first.planned
    for m in methods:
        if m in tables:
            continue
        if not reuse:
            tables[m] = calibrate(ir_model, data, tensors, method=m, **kwargs)
            continue
        key = dataclasses.replace(first.key, method=m, options=make_observer(m).config())
        states = [o.state() for o in first.observers]
        observers, cmeans, samples = _from_histograms((first.names, states, first.cmeans, first.samples), key, {})
        tables[m] = _Observed(key, first.planned, first.names, observers, cmeans, samples).to_table(cache)
    return {m: tables[m] for m in methods}


def _cached_table(cache: CalibCache, key: CacheKeys) -> CalibrationTable | None:
    stored = cache.load_table(key)
    if stored is None:
        return None
    try:
        table = CalibrationTable.from_dict(stored)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        logger.warning("ignoring an unreadable cached calibration table: %s", e)
        return None
    logger.info("calibration table from cache (%s)", key.table)
    return table


def _run_with_fallback(run, plan, replan, default_taps: bool):
    """``run(plan)``; when it fails with default taps lifted out of loop bodies (a loop value whose shape
    changes between iterations), run again without loop bodies. Returns ``(names, observers, ...)``."""
    try:
        return (plan.names, *run(plan))
    except RuntimeFailure as e:
        if not default_taps or not any(t.extra_axes for t in plan.taps):
            raise
        logger.warning("calibration: ONNX Runtime refused the loop-body taps (%s); calibrating again "
                       "without tensors inside Loop/Scan bodies", str(e).splitlines()[0][:200])
    plan = replan(lift_loops=False, channel_means=())
    return (plan.names, *run(plan))


def _collect(plan, *, source, key: CacheKeys, observer_opts, providers, progress):
    """Run the data through the tap model into fresh observers (data validated first)."""
    total = sum(1 for _ in source)  # validates every feed before any run (DataError)
    observers = [make_observer(key.method, **observer_opts) for _ in plan.taps]
    sums = {plan.names.index(n): _ChannelSum() for n in key.means if n in plan.names}
    session = calib_taps.open_session(plan, providers) if plan.model is not None else None
    plan.model = None  # ONNX Runtime holds its own copy now
    runner = TapRunner(session, plan.taps, source.specs, key.batch_size, checks=plan.checks)

    def sink(i: int, data) -> None:
        if isinstance(data, Reduced):
            observers[i].update_extremes(data.vmin, data.vmax, data.size, data.outliers)
            if i in sums and data.channel_sum is not None:
                sums[i].add_sums(data.channel_sum, data.size)
            return
        observers[i].update(data)
        if i in sums:
            sums[i].add(data, 1 + plan.taps[i].extra_axes, plan.names[i])

    bar = make_progress(progress, total)
    try:
        runner.run(source, sink, bar.update)
    finally:
        bar.close()
    logger.info("calibration: %d samples in %d runs, %d tensors", total, runner.runs, len(plan.taps))
    cmeans = {plan.names[i]: s.mean() for i, s in sums.items() if s.n}
    return observers, cmeans, total


class _ChannelSum:
    """Per-channel sums along one axis (float64), for channel means."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.n = 0

    def add(self, array: np.ndarray, axis: int, name: str) -> None:
        if array.size == 0:
            return
        if array.ndim <= axis:
            raise ConfigError(f"channel mean of {name!r}: it has rank {array.ndim}, no channel axis {axis}")
        other = tuple(a for a in range(array.ndim) if a != axis)
        s = array.sum(axis=other, dtype=np.float64)
        if self.sum is not None and s.shape != self.sum.shape:
            raise ConfigError(f"channel mean of {name!r}: channel count changed ({self.sum.shape} -> {s.shape})")
        self.sum = s if self.sum is None else self.sum + s
        self.n += array.size // array.shape[axis]

    def add_sums(self, sums: np.ndarray, size: int) -> None:
        """Per-channel sums reduced in the graph over a tensor of ``size`` elements."""
        if size == 0 or sums.size == 0:
            return
        sums = sums.astype(np.float64)
        self.sum = sums if self.sum is None else self.sum + sums
        self.n += size // sums.size

    def mean(self) -> np.ndarray:
        return self.sum / self.n


def _from_histograms(stored, key: CacheKeys, observer_opts):
    """Observers rebuilt from cached histogram state, or ``(None, None, 0)`` when it does not serve."""
    if stored is None or (key.method not in HISTOGRAM_METHODS and key.method != "minmax"):
        return None, None, 0
    names, states, cmeans, samples = stored
    if set(names) != set(key.names) or not set(key.means) <= set(cmeans):
        return None, None, 0
    by_name = dict(zip(names, states))
    observers = []
    for name in key.names:
        obs = make_observer(key.method, **observer_opts)
        if isinstance(obs, HistogramObserver):
            obs.load_state(by_name[name])
        else:  # minmax: the exact extremes the histogram observers track
            s = by_name[name]
            obs.observed_min, obs.observed_max = (float(v) for v in s["scalars"][2:])
            obs.count, obs.outliers = (int(v) for v in s["tallies"])
        observers.append(obs)
    logger.info("calibration: %s ranges from cached histograms (%s), model not run", key.method, key.hist)
    return observers, {n: cmeans[n] for n in key.means}, samples


def _build_table(names, observers, cmeans, key: CacheKeys, samples: int, not_run=()) -> CalibrationTable:
    ranges: dict[str, TensorRange] = {}
    unobserved = list(not_run)
    for name, obs in zip(names, observers):
        if obs.count == 0:
            unobserved.append(name)
            continue
        cm = cmeans.get(name)
        ranges[name] = make_range(name, obs, tuple(float(v) for v in cm) if cm is not None else None)
    if unobserved:
        logger.warning("calibration: %d tensors were never observed (untaken If branches, or loop bodies "
                       "left out): %s", len(unobserved), unobserved[:10])
    return CalibrationTable(ranges, key.method, key.model, key.data, samples,
                            {**key.options, "batch_size": key.batch_size}, tuple(unobserved))


def make_range(name: str, obs, channel_mean=None) -> TensorRange:
    """The ``TensorRange`` of an observer, with the safe fallbacks of the module docstring."""
    note = None
    if not obs.seen:
        lo, hi, omin, omax = 0.0, MIN_SPAN, 0.0, 0.0
        note = (f"all {obs.outliers} values were outliers (|x| >= {obs.outlier_abs:g}); "
                "range is a placeholder, keep this tensor in float")
    else:
        omin, omax = float(obs.observed_min), float(obs.observed_max)
        lo, hi = (float(v) for v in obs.range())
        if omin == omax:
            lo, hi = min(omin, 0.0), max(omax, 0.0)
            note = f"constant value {omin:g}: range [min(c, 0), max(c, 0)]"
        if max(hi, 0.0) - min(lo, 0.0) < MIN_SPAN:
            lo, hi = (lo, lo + MIN_SPAN) if lo >= 0 or hi > 0 else (hi - MIN_SPAN, hi)
            note = (note + "; " if note else "") + f"span below {MIN_SPAN:g}, widened to it"
        if obs.outliers:
            extra = f"{obs.outliers} outliers (|x| >= {obs.outlier_abs:g} or NaN) excluded"
            note = f"{note}; {extra}" if note else extra
    return TensorRange(name, lo, hi, omin, omax, int(obs.count), int(obs.outliers), channel_mean, note)
