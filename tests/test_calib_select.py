"""quantize(method="auto"): ranges and bias correction chosen by drift on calibration feeds."""

from __future__ import annotations

import numpy as np
import pytest

import onnxshrink
from onnxshrink import calib_select
from onnxshrink.errors import ConfigError
from tests.qdq_helpers import feeds_for, model, weights
from tests.test_recovery import _biased_conv


def _conv(size: int = 64):
    return model(f"""g (float[1,4,{size},{size}] inp) => (float[1,4,{size},{size}] out) {{
        out = Conv <pads=[1,1,1,1]> (inp, W, B)
    }}""", {"W": weights(4, 4, 3, 3, seed=3), "B": weights(4, seed=4)})


def _auto(proto, feeds, **kw):
    return onnxshrink.quantize(proto, feeds, tune=False, cache_dir=False, **kw)


def test_one_rare_outlier_makes_auto_choose_percentile():
    proto = _conv()
    feeds = feeds_for(proto, n=12)
    feeds[10]["inp"][0, 0, 5, 5] = 300.0  # one value in 196608 widens the min/max range 50x
    res = _auto(proto, feeds)
    sel = res.recovery["calibration"]
    assert sel["method"] == "percentile" and res.method.startswith("auto: percentile"), sel
    assert [(t["method"], t["bias_correction"]) for t in sel["tried"]] == list(calib_select.CANDIDATES)
    assert sel["feeds"] == calib_select.FEEDS
    assert res.table["inp"].max < 10 < res.table["inp"].observed_max


def test_well_behaved_ranges_keep_minmax():
    proto = _conv(16)
    res = _auto(proto, feeds_for(proto, n=12), bias_correction=False)
    sel = res.recovery["calibration"]
    assert sel["method"] == "minmax" and not sel["bias_correction"], sel
    assert len(sel["tried"]) == 2  # bias correction off: only the two range methods


def test_a_systematic_weight_shift_makes_auto_choose_bias_correction():
    proto = _biased_conv()
    feeds = [{"inp": np.abs(f["inp"]) + 1.0} for f in feeds_for(proto, n=8)]
    res = _auto(proto, feeds, per_channel=False)
    assert res.recovery["calibration"]["bias_correction"] is True
    assert res.recovery["bias_correction"]["layers_corrected"] == 1


def test_auto_refuses_observer_options():
    proto = _conv(8)
    with pytest.raises(ConfigError, match="auto"):
        _auto(proto, feeds_for(proto, n=2), percentile=99.9)
