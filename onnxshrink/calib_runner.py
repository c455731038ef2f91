"""The calibration runner: one session, feeds in batches, every tap's data handed to a sink.

Feeds are stacked along axis 0, up to ``batch_size`` per run, when every input has a dynamic first dim,
each feed's inputs agree on it and the other dims match the batch's first feed; otherwise each feed runs
alone. Stacking needs rows to be independent (dim 0 a batch axis): the first stacked run is checked
against a single run of its first feed on the model's own outputs (``checks``), and if they differ, or a
stacked run fails, its feeds are rerun one by one and stacking stops. The first run takes one feed and measures its tapped tensors
(whole or reduced in the graph, see ``calib_reduce``): batches are then capped so that one run's tapped
tensors stay under ``max_batch_bytes``. At most one batch (plus one feed that did not fit it) and that
batch's outputs are held at a time.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from onnxshrink.errors import RuntimeFailure

logger = logging.getLogger(__name__)

#: Tapped tensors of one run above this many bytes shrink the batch (never below one feed).
MAX_BATCH_BYTES = 256 << 20
#: The same cap when some taps are fetched whole (histogram observers): the fetched batch, ORT's copy of
#: it and the observers' temporaries are all alive at once, so a run's tensors cost a few times their
#: bytes (peak RSS per method: ``benchmarks/results/calib_memory.md``).
MAX_FETCH_BYTES = 32 << 20


class Reduced(NamedTuple):
    """A tap's batch seen through in-graph reductions (``calib_reduce``)."""

    vmin: float
    vmax: float
    outliers: int
    size: int
    channel_sum: np.ndarray | None


class TapRunner:
    """Runs ``session`` (anything with ``run(None, feed)``; None when every tap reads a feed) over feeds
    and calls ``sink(index, data)`` per tap, ``data`` an array or a ``Reduced``. ``runs`` counts runs."""

    def __init__(self, session, taps, specs, batch_size: int = 8, max_batch_bytes: int | None = None,
                 checks: list[int] = ()):
        self.session = session
        self.taps = list(taps)
        if max_batch_bytes is None:
            fetched = any(t.output is not None for t in self.taps)
            max_batch_bytes = MAX_FETCH_BYTES if fetched else MAX_BATCH_BYTES
        self.checks = list(checks)
        self.verified = False
        self.batch_size = max(1, int(batch_size))
        self.max_batch_bytes = max_batch_bytes
        self.stack = self.batch_size > 1 and all(s.dims and not isinstance(s.dims[0], int) for s in specs)
        self.runs = 0

    def run(self, feeds, sink, on_done=lambda n: None) -> None:
        for group in self._groups(feeds):
            self._run_group(group, sink)
            on_done(len(group))

    def _groups(self, feeds):
        group: list[dict] = []
        for feed in feeds:
            if group and not self._fits(group[0], feed):
                yield group
                group = []
            group.append(feed)
            if len(group) >= (self.batch_size if self.stack and self.runs else 1):
                yield group
                group = []
        if group:
            yield group

    def _fits(self, first: dict, feed: dict) -> bool:
        if not self.stack:
            return False
        rows = {a.shape[0] for a in feed.values()}
        return len(rows) == 1 and all(feed[k].shape[1:] == first[k].shape[1:] for k in first)

    def _run_group(self, group: list[dict], sink) -> None:
        if len(group) == 1:
            self._run_one(group[0], sink)
            return
        stacked = {k: np.concatenate([f[k] for f in group], axis=0) for k in group[0]}
        try:
            outs = self.session.run(None, stacked) if self.session is not None else []
            if not self.verified:
                self._verify(group[0], outs)
        except Exception as e:  # noqa: BLE001 - ORT raises its own types; rerun one by one
            logger.info("calibration: feeds cannot be stacked on axis 0 (%s); running them one by one", e)
            self.stack = False
            for feed in group:
                self._run_one(feed, sink)
            return
        self._after_run(outs, len(group))
        self._hand_out(stacked, outs, sink)

    def _verify(self, first: dict, outs: list) -> None:
        """The model's own outputs for ``first`` must be the leading rows of the stacked run's."""
        single = self.session.run(None, first) if self.session is not None else []
        self.runs += 1
        rows = next(iter(first.values())).shape[0]
        for k in self.checks:
            a, b = single[k], outs[k]
            if not (a.ndim and b.ndim == a.ndim and b.shape[1:] == a.shape[1:] and a.shape[0] == rows
                    and np.allclose(b[:rows], a, rtol=1e-3, atol=1e-4, equal_nan=True)):
                raise ValueError(f"output {k} of the first feed changes when stacked (is axis 0 a batch axis?)")
        self.verified = True

    def _run_one(self, feed: dict, sink) -> None:
        outs = []
        if self.session is not None:
            try:
                outs = self.session.run(None, feed)
            except Exception as e:
                raise RuntimeFailure(f"calibration: ONNX Runtime failed on a feed: {e}") from e
            self._after_run(outs, 1)
        self._hand_out(feed, outs, sink)

    def _after_run(self, outs: list, feeds: int) -> None:
        self.runs += 1
        if self.runs == 1 and self.stack:
            per_feed = self._tapped_bytes(outs) / feeds
            cap = max(1, int(self.max_batch_bytes // max(per_feed, 1)))
            if cap < self.batch_size:
                logger.info("calibration: %.0f MB of tapped tensors per feed; batches of %d feeds",
                            per_feed / 2**20, cap)
                self.batch_size = cap

    def _tapped_bytes(self, outs: list) -> int:
        """Bytes of every tapped tensor of one run, whether fetched whole or reduced in the graph."""
        total = 0
        for tap in self.taps:
            if tap.output is not None:
                total += getattr(outs[tap.output], "nbytes", 0)
            elif tap.stats is not None:
                low, size = outs[tap.stats[0]], outs[tap.stats[3]]
                total += int(size) * getattr(low, "itemsize", 4)
        return total

    def _hand_out(self, feed: dict, outs: list, sink) -> None:
        for i, tap in enumerate(self.taps):
            if tap.feed is not None:
                sink(i, feed[tap.feed])
            elif tap.output is not None:
                sink(i, outs[tap.output])
            else:
                lo, hi, n_out, size = (outs[k] for k in tap.stats)
                sums = outs[tap.channel_sum] if tap.channel_sum is not None else None
                sink(i, Reduced(float(lo), float(hi), int(n_out), int(size), sums))
