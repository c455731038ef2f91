"""The rewrites that close the gaps to onnxslim/onnxsim on the real PP-OCR models fire there (their
outputs are checked equal by ``test_real_models``): Mul by 1 after a Conv with no value_info, Conv
followed by a per-channel Mul folded into the weights, written-out hard-swish fused."""

from __future__ import annotations

import pytest

from models import fetch_real
from onnxshrink import model_io
from onnxshrink.graph_utils import const_array
from onnxshrink.pipeline import Pipeline, preset_steps

pytestmark = pytest.mark.realmodel


def _optimized(name: str):
    try:
        path = fetch_real.fetch(name)
    except fetch_real.FetchError as e:
        pytest.skip(f"cannot fetch real model {name}: {e}")
    model = model_io.load(path)
    report = Pipeline(preset_steps("default")).run(model)
    return model, report.per_pass()


def _scaled_convs(model) -> int:
    """Mul/Div nodes that read a Conv output and a constant (what fuse_conv_bias folds)."""
    count = 0
    for node in model.graph:
        if node.op_type in ("Mul", "Div"):
            producers = [v.producer().op_type if v is not None and v.producer() is not None else None
                         for v in node.inputs]
            if "Conv" in producers and any(const_array(v) is not None for v in node.inputs):
                count += 1
    return count


def test_ppocr_rec_gaps_closed():
    model, passes = _optimized("ppocr_rec")
    assert passes["eliminate_identities"]["counts"]["neutral_removed"] >= 7  # 3 of them with no shapes
    ones = [n for n in model.graph if n.op_type == "Mul" and any(
        (a := const_array(v)) is not None and a.size == 1 and float(a.reshape(-1)[0]) == 1.0 for v in n.inputs)]
    assert not ones
    assert _scaled_convs(model) == 0 and not [n for n in model.graph if n.op_type == "Clip"]
    assert passes["fuse_activations"]["counts"]["hardswish_fused"] >= 20


def test_ppocr_det_gaps_closed():
    model, passes = _optimized("ppocr_det")
    assert passes["fuse_conv_bias"]["counts"]["conv_scales_fused"] >= 28
    assert _scaled_convs(model) == 0
    ops = [n.op_type for n in model.graph]
    assert "Clip" not in ops and ops.count("HardSigmoid") >= 24
