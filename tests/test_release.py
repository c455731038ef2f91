"""Searches free the candidate models they drop at once (``graph_utils.release_models``). An ``onnx_ir``
model's graph is a web of reference cycles (nodes and values point at each other), which outlives the
``Model`` object and which only Python's cyclic collector frees, when it runs: quantizing a 2.25 GiB
model kept every calibration candidate's nodes and int8 weights (0.6 GB each) until a collection
happened to run. These tests turn the automatic collection off, so that only an explicit release
frees a dropped graph, and count the built graphs' nodes still alive through weak references."""

from __future__ import annotations

import gc
import weakref

import pytest

import onnxshrink
from onnxshrink import recovery
from tests.qdq_helpers import feeds_for, fragile_chain


class Built(list):
    """Weak references to a node of every model built (a node lives as long as its graph's cycles do),
    and how many of the models built before were alive as each build began."""

    def __init__(self) -> None:
        super().__init__()
        self.alive_at_build: list[int] = []


@pytest.fixture
def built(monkeypatch):
    """What ``recovery.Builder`` builds (``Built``), with automatic collection off."""
    refs = Built()
    build = recovery.Builder.__call__

    def recorded(self, keep_float=()):
        refs.alive_at_build.append(_alive(refs))
        out = build(self, keep_float)
        refs.append(weakref.ref(out.graph[len(out.graph) - 1]))
        return out

    monkeypatch.setattr(recovery.Builder, "__call__", recorded)
    gc.collect()
    gc.disable()
    try:
        yield refs
    finally:
        gc.enable()


def _alive(refs) -> int:
    return sum(r() is not None for r in refs)


def test_calibration_selection_keeps_only_the_model_it_returns(built, tmp_path):
    proto = fragile_chain()
    res = onnxshrink.quantize(proto, feeds_for(proto, n=8), tmp_path / "q.onnx", tune=False, cache_dir=False)
    tried = res.recovery["calibration"]["tried"]
    assert len(tried) == len(built) >= 4  # every candidate built once
    # the best so far, and where pair-safe weights are tried the pair-safe candidate built early for the
    # joint bias measurement, until its turn; each candidate that lost is gone
    assert max(built.alive_at_build) == (2 if any(t.get("pair_safe") for t in tried) else 1)
    assert _alive(built) == 1 and any(r() is res.model.graph[len(res.model.graph) - 1] for r in built)


def test_mixed_precision_keeps_only_the_model_it_returns(built, tmp_path):
    proto = fragile_chain()
    feeds = feeds_for(proto, n=6)
    kw = {"per_channel": False, "tune": False, "cache_dir": False, "method": "minmax", "reduce_range": False}
    res = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", max_drift=1e-6, **kw)
    mp = res.recovery["mixed_precision"]
    assert len(mp["evaluations"]) >= 3 and len(built) >= 3
    # the first build (all int8: the caller's, kept to the end) and the search's current upper end
    assert max(built.alive_at_build) <= 2
    assert any(r() is res.model.graph[len(res.model.graph) - 1] for r in built)
