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
    return onnxshrink.quantize(proto, feeds, **{"tune": False, "cache_dir": False, **kw})


def test_one_rare_outlier_makes_auto_choose_percentile():
    proto = _conv()
    feeds = feeds_for(proto, n=12)
    feeds[10]["inp"][0, 0, 5, 5] = 300.0  # one value in 196608 widens the min/max range 50x
    res = _auto(proto, feeds)
    sel = res.recovery["calibration"]
    assert sel["method"] == "percentile" and res.method.startswith("auto: percentile"), sel
    ranges = [(t["method"], t["bias_correction"]) for t in sel["tried"] if not t.get("pair_safe")]
    assert ranges == list(calib_select.CANDIDATES)
    assert sel["feeds"] == calib_select.FEEDS
    assert res.table["inp"].max < 10 < res.table["inp"].observed_max


def test_well_behaved_ranges_keep_minmax():
    proto = _conv(16)
    res = _auto(proto, feeds_for(proto, n=12), bias_correction=False)
    sel = res.recovery["calibration"]
    assert sel["method"] == "minmax" and not sel["bias_correction"], sel
    assert len([t for t in sel["tried"] if not t.get("pair_safe")]) == 2  # bias correction off: two range methods


def test_a_systematic_weight_shift_makes_auto_choose_bias_correction():
    proto = _biased_conv()
    feeds = [{"inp": np.abs(f["inp"]) + 1.0} for f in feeds_for(proto, n=8)]
    res = _auto(proto, feeds, per_channel=False)
    assert res.recovery["calibration"]["bias_correction"] is True
    assert res.recovery["bias_correction"]["layers_corrected"] == 1


def test_progress_counts_the_candidates_judged(capsys):
    """``progress=True`` draws a bar of the calibration candidates (one step each, after the calibration
    feeds' bar); a callable gets the calibration feeds only."""
    proto = _conv(16)
    feeds = feeds_for(proto, n=12)
    res = _auto(proto, feeds, bias_correction=False, progress=True)
    n = len(res.recovery["calibration"]["tried"])
    err = capsys.readouterr().err
    assert f"choosing calibration [{'#' * 24}] {n}/{n} candidates" in err
    assert err.index("calibrating") < err.index("choosing calibration")
    calls = []
    _auto(proto, feeds, bias_correction=False, progress=lambda done, total: calls.append(total))
    assert calls and set(calls) == {len(feeds)} and "choosing" not in capsys.readouterr().err


def test_auto_refuses_observer_options():
    proto = _conv(8)
    with pytest.raises(ConfigError, match="auto"):
        _auto(proto, feeds_for(proto, n=2), percentile=99.9)


@pytest.fixture
def saturating_conv(monkeypatch):
    """This CPU's int8 Conv kernel clips 8-bit weights, whatever the CPU (the probe's answer on AVX2
    without VNNI), so ``reduce_range="auto"`` narrows the Conv's weights."""
    from onnxshrink import ort_int8

    monkeypatch.setattr(ort_int8, "saturating_ops", lambda *a, **k: frozenset({"Conv"}))


def _isolated_peak_conv():
    """A Conv whose largest weight per output channel has small neighbours: pair-safe weights keep 8 bits
    there, 7-bit ones lose one, so the pair-safe build drifts less."""
    w = weights(4, 4, 3, 3, seed=5) * 0.1
    w[:, 0, 1, 1] = 2.0
    return model("""g (float[1,4,16,16] inp) => (float[1,4,16,16] out) {
        out = Conv <pads=[1,1,1,1]> (inp, W, B)
    }""", {"W": w, "B": weights(4, seed=6)})


def test_auto_tries_pair_safe_weights_where_the_kernels_saturate_and_keeps_them_when_they_drift_less(
        saturating_conv):
    proto = _isolated_peak_conv()
    res = _auto(proto, feeds_for(proto, n=8))
    sel = res.recovery["calibration"]
    extra = [t for t in sel["tried"] if t.get("pair_safe")]
    assert len(extra) == len(calib_select.CANDIDATES) and any(t["kept"] for t in extra) and sel["pair_safe"], sel
    best_seven = min(t["drift"] for t in sel["tried"] if not t.get("pair_safe"))
    assert min(t["drift"] for t in extra) < best_seven
    assert res.options.pair_safe and res.method.endswith("+ pair-safe weights")


def test_both_encodings_bias_shifts_are_measured_in_one_probe(saturating_conv, monkeypatch):
    """With pair-safe weights tried, the first corrected 7-bit build measures the pair-safe shifts too,
    in the same probe session (one ``measure_sets`` call with two target sets, the Relu's mask shared),
    and they are the shifts a probe of their own measures; every candidate is still built and judged
    once, and no other probe is opened."""
    from onnxshrink import bias_correction

    proto = model("""g (float[1,4,16,16] inp) => (float[1,4,16,16] out) {
        a = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        r = Relu(a)
        out = Conv <pads=[1,1,1,1]> (r, W2, B2)
    }""", {"W1": weights(4, 4, 3, 3, seed=7), "B1": weights(4, seed=8), "W2": weights(4, 4, 3, 3, seed=9),
           "B2": weights(4, seed=10)})
    measure, calls = bias_correction.measure_sets, []

    def spy(float_model, target_sets, data, **kwargs):
        joint = measure(float_model, target_sets, data, **kwargs)
        alone = [measure(float_model, [t], data, **kwargs)[0] for t in target_sets]
        calls.append((joint, alone))
        return joint

    monkeypatch.setattr(bias_correction, "measure_sets", spy)
    res = _auto(proto, feeds_for(proto, n=8))
    tried = res.recovery["calibration"]["tried"]
    assert len(tried) == 2 * len(calib_select.CANDIDATES)
    assert len(calls) == 1 and len(calls[0][0]) == 2  # one probe, both encodings
    joint, alone = calls[0]
    assert all(set(j) == set(a) and len(j) == 2 for j, a in zip(joint, alone))
    for j, a in zip(joint, alone):
        for name in j:
            np.testing.assert_allclose(j[name], a[name], rtol=1e-6, atol=1e-9)
    assert any(not np.array_equal(joint[0][n], joint[1][n]) for n in joint[0])  # the encodings' own shifts


@pytest.mark.parametrize("kw", [{"pair_safe": False}, {"pair_safe": True}, {"reduce_range": True},
                                {"method": "minmax"}])
def test_pair_safe_not_tried_when_the_caller_chose(kw, saturating_conv):
    proto = _isolated_peak_conv()
    res = _auto(proto, feeds_for(proto, n=8), **kw)
    sel = res.recovery.get("calibration", {"tried": [], "pair_safe": False})
    assert not any(t.get("pair_safe") for t in sel["tried"])
    assert res.options.pair_safe is bool(kw.get("pair_safe"))


def test_pair_safe_not_tried_where_nothing_is_narrowed(monkeypatch):
    from onnxshrink import ort_int8

    monkeypatch.setattr(ort_int8, "saturating_ops", lambda *a, **k: frozenset())
    proto = _isolated_peak_conv()
    res = _auto(proto, feeds_for(proto, n=8))
    assert not any(t.get("pair_safe") for t in res.recovery["calibration"]["tried"])


def test_cli_pair_safe_flag_and_summary(saturating_conv, tmp_path, capsys):
    import onnx

    from onnxshrink.cli import main

    proto = _isolated_peak_conv()
    src, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(proto, src)
    calib.mkdir()
    for i, feed in enumerate(feeds_for(proto, n=4)):
        np.savez(calib / f"{i}.npz", **feed)
    assert main(["optimize", str(src), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8", "--no-tune",
                 "--calibration", str(calib), "--pair-safe"]) == 0
    assert "pair-safe weights for Conv" in capsys.readouterr().out
    assert main(["optimize", str(src), "--pair-safe"]) == 2  # only with --quantize


def test_progress_bar_of_the_placement_tuner(capsys):
    """With the tuner on, ``progress=True`` also draws its bar: one step per placement considered (every
    one of ``STEPS`` for a conv model, whether or not it changes the quantized nodes)."""
    from onnxshrink import qdq_tune

    proto = _conv(16)
    _auto(proto, feeds_for(proto, n=4), bias_correction=False, progress=True, tune=True)
    n = len(qdq_tune.STEPS)
    err = capsys.readouterr().err
    assert f"tuning placement [{'#' * 24}] {n}/{n} placements" in err
    assert err.index("tuning placement") < err.index("choosing calibration")
