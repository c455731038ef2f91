"""bench: statistics, interleaving order, the paired ratio, skipped providers, the CLI (no timed assertions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxshrink import bench
from onnxshrink.cli import main
from onnxshrink.runtime import available_providers


def test_paired_ratio_hand_computed():
    r = bench.paired_ratio([2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0], bootstrap=200)
    assert (r.speedup, r.ci_low, r.ci_high, r.pair_p50, r.pairs) == (2.0, 2.0, 2.0, 2.0, 4)
    assert r.latency_ratio == 0.5
    r = bench.paired_ratio([3.0, 1.0, 2.0], [1.0, 1.0, 2.0], bootstrap=0)
    assert r.speedup == 2.0  # median 2 / median 1
    assert r.pair_p50 == 1.0  # per-round ratios 3, 1, 1
    with pytest.raises(Exception, match="equally long"):
        bench.paired_ratio([1.0], [1.0, 2.0])


def test_rounds_interleave_and_flip_order():
    calls = []
    runners = [lambda: calls.append("A"), lambda: calls.append("B")]
    times = bench._interleaved(runners, 4, lambda done: None)
    assert "".join(calls) == "ABBAABBA"
    assert [len(t) for t in times] == [4, 4]


def test_latency_stats_are_consistent():
    s = bench.LatencyStats.from_seconds([0.001, 0.002, 0.003, 0.004, 0.010], batch=4)
    assert (s.runs, s.median_ms, s.min_ms, s.mean_ms) == (5, 3.0, 1.0, 4.0)
    assert s.median_ms <= s.p90_ms <= s.p99_ms <= 10.0
    assert s.throughput == pytest.approx(4 * 1000 / 3.0)


def test_measure_two_models_interleaved(zoo_model):
    path = str(zoo_model("plain_cnn"))
    report = bench.measure([path, path], None, runs=6, warmup=1, dims={"N": 2})
    cpu = report.providers["cpu"]
    assert not cpu.skipped and [m.label for m in cpu.models] == ["reference", "candidate"]
    for m in cpu.models:
        lat = m.latency
        assert lat.runs == 6 and lat.batch == 2
        assert lat.min_ms <= lat.median_ms <= lat.p90_ms <= lat.p99_ms
        assert m.session_seconds > 0 and m.memory_kind
    assert cpu.ratio.pairs == 6 and cpu.ratio.ci_low <= cpu.ratio.speedup <= cpu.ratio.ci_high
    assert cpu.threads["intra_op_num_threads"] == 1 and "1 intra-op thread" in cpu.threads["note"]
    doc = report.to_dict()
    json.dumps(doc)
    assert doc["providers"]["cpu"]["ratio"]["latency_ratio"] == pytest.approx(1 / cpu.ratio.speedup)


@pytest.mark.skipif("TensorrtExecutionProvider" in available_providers(), reason="TensorRT is available here")
def test_unavailable_provider_is_skipped_with_a_reason(zoo_model):
    path = str(zoo_model("mlp"))
    report = bench.measure([path], None, providers="cpu,tensorrt", runs=2, warmup=0, dims={"N": 1})
    assert report.providers["tensorrt"].skipped and "not available" in report.providers["tensorrt"].skipped
    assert not report.providers["cpu"].skipped and report.providers["cpu"].ratio is None


def test_bad_arguments(zoo_model):
    path = str(zoo_model("mlp"))
    with pytest.raises(Exception, match="one or two models"):
        bench.measure([path] * 3)
    with pytest.raises(Exception, match="runs must be"):
        bench.measure([path], runs=0)


def test_cli_bench_json_and_summary(zoo_model, tmp_path, capsys):
    path = str(zoo_model("mlp"))
    data = tmp_path / "feed.npz"
    from onnxshrink import data as data_mod
    from onnxshrink import model_io

    spec = data_mod.input_specs(model_io.load(path))[0]
    np.savez(data, **{spec.name: np.zeros(spec.concrete_shape({}, default=3), spec.dtype)[None]})
    out = tmp_path / "bench.json"
    rc = main(["bench", path, path, "--data", str(data), "--runs", "4", "--warmup", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "speed-up of candidate over reference" in text and "1 intra-op thread" in text
    doc = json.loads(out.read_text())
    assert doc["runs"] == 4 and doc["providers"]["cpu"]["models"][1]["latency"]["runs"] == 4
    assert doc["feed"][spec.name][0] == 3
