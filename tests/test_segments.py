"""Stage-by-stage reading (``onnxshrink.segments``): the values one tap model per stage reads, each node
built into a segment once over all stages, a weight changed between stages seen downstream, the
frontier's files removed, control flow read with tap models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import zoo
from onnxshrink import model_io, segments
from onnxshrink.graph_utils import NameGen
from onnxshrink.importance import TapReader
from onnxshrink.reconstruct_layers import replace_const
from tests.conftest import check_close, random_feeds


def _load(name: str):
    return model_io.load(onnx.shape_inference.infer_shapes(zoo.build(name)))  # value types, for the taps


def _stages_of(model, size: int) -> list[list]:
    """Every named node output that something reads, in graph order, in stages of ``size``."""
    values = [v for n in model.graph for v in n.outputs
              if v.name and (v.uses() or v.is_graph_output()) and n.op_type != "Constant"
              and v.dtype is not None and v.dtype.is_floating_point()]  # what a tap model can read
    return [values[i:i + size] for i in range(0, len(values), size)]


def _read_stages_as_taps_do(reader, model, feeds, after_stage=lambda: None) -> None:
    """Read every stage of ``model`` (``_stages_of(model, 3)``) through ``reader`` and check each
    feed's arrays against one tap model of the stage; ``after_stage`` runs after each."""
    for stage in _stages_of(model, 3):
        read = reader.begin(stage)
        got = [read(i, feed) for i, feed in enumerate(feeds)]
        read.finish()
        tap = TapReader(model, stage)
        for feed, arrays in zip(feeds, got):
            check_close(arrays, tap(feed), rtol=1e-5, atol=1e-5)
        after_stage()


class _Counting(segments.SegmentedReader):
    built = 0

    def _session(self, nodes, reads, outputs):
        type(self).built += sum(n.op_type != "Constant" for n in nodes)  # a Constant runs where needed
        return super()._session(nodes, reads, outputs)


@pytest.mark.parametrize("name", ["resnet", "inception", "densenet", "split_branches", "transformer", "dynamic_batch"])
def test_segments_read_the_values_tap_models_read(name):
    model = _load(name)
    feeds = random_feeds(model, batch=2, n=3)
    _Counting.built = 0
    with _Counting(model) as reader:
        _read_stages_as_taps_do(reader, model, feeds)
        folder = reader._dir
        assert folder.is_dir()
    assert not folder.exists()  # the frontier's files go with the reader
    real = [n for n in model.graph if n.op_type != "Constant"]
    assert len(real) - 2 <= _Counting.built <= len(real), (_Counting.built, len(real))  # each node once


def test_a_weight_changed_between_stages_is_seen_downstream():
    model = _load("plain_cnn")
    convs = [n for n in model.graph if n.op_type == "Conv"]
    first, second = convs[0], convs[1]
    feeds = random_feeds(model, batch=1, n=2)
    with segments.SegmentedReader(model) as reader:
        read = reader.begin([first.inputs[0]])
        [read(i, f) for i, f in enumerate(feeds)]
        read.finish()
        w = np.asarray(first.inputs[1].const_value.numpy())
        replace_const(model, first, 1, w * -0.5, NameGen(model))  # the first conv has not run yet
        read = reader.begin([second.inputs[0]])
        got = [read(i, f)[0] for i, f in enumerate(feeds)]
        read.finish()
    want = [TapReader(model, [second.inputs[0]])(f)[0] for f in feeds]
    check_close(got, want, rtol=1e-5, atol=1e-5)


def test_control_flow_is_read_with_tap_models():
    model = _load("control_flow")
    reader = segments.reader(model)
    assert isinstance(reader, segments.TapStages)
    feeds = random_feeds(model, batch=2, n=2)
    stage = _stages_of(model, 100)[0]
    with reader:
        read = reader.begin(stage)
        for i, feed in enumerate(feeds):
            check_close(read(i, feed), TapReader(model, stage)(feed))
        read.finish()


def test_reconstruction_builds_each_node_into_a_segment_once(monkeypatch):
    """A 40-block residual net refits 40 stages; one tap model per stage built and ran ~20x the
    model (quadratic in depth: ``results/reconstruct_scale.md``). Segments build each node once per
    model read (the pruned model and the original)."""
    from models.zoo_conv import deep_resnet
    from onnxshrink import pruning

    proto = deep_resnet(40)
    monkeypatch.setattr(segments, "SegmentedReader", _Counting)
    _Counting.built = 0
    feeds = random_feeds(model_io.load(proto), batch=2, n=3)
    result = pruning.prune(proto, 0.5, round_to=1, min_width=1, calibration=feeds, reconstruct=True)
    refit = result.reconstruction["refit"]
    assert len(refit) == 81 and result.reconstruction["passes"] >= 80  # both convs of every block, the head
    assert all(r["mse_after"] <= r["mse_before"] for r in refit)
    assert 0 < _Counting.built <= 2 * len(proto.graph.node), (_Counting.built, len(proto.graph.node))


def test_a_frontier_over_its_disk_budget_falls_back_to_tap_models():
    """Past ``max_bytes`` the saved values go and later stages run the model from its inputs: the
    same values, and no more disk."""
    model = _load("resnet")
    feeds = random_feeds(model, batch=2, n=3)
    with segments.SegmentedReader(model, max_bytes=20_000) as reader:
        def disk_within_budget():
            assert sum(f.stat().st_size for f in reader._dir.iterdir()) <= 20_000 + 1024 * len(feeds)

        _read_stages_as_taps_do(reader, model, feeds, disk_within_budget)
        assert reader._fallback is not None and not any(reader._dir.iterdir())


def test_no_writable_temp_folder_reads_with_tap_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(segments.tempfile, "mkdtemp", refuse)
    model = _load("resnet")
    assert isinstance(segments.reader(model), segments.TapStages)
