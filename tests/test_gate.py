"""The gate: config files and overrides, the pure decision, JUnit/Markdown/JSON, CLI exit codes 0/1/2."""

from __future__ import annotations

import json
import subprocess
import sys
from xml.etree import ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxshrink import gate
from onnxshrink.cli import main
from onnxshrink.errors import ConfigError


def drift(cosine=1.0, sqnr="inf", top1=1.0, nonfinite=0, problems=(), metric=None):
    out = {"cosine": cosine, "worst_feed_cosine": cosine, "max_abs_error": 0.01, "mean_abs_error": 0.001,
           "max_rel_error": 0.1, "sqnr_db": sqnr, "top1_agreement": top1, "top5_agreement": None,
           "nonfinite": nonfinite}
    return {"outputs": {"logits": dict(out)}, "overall": dict(out), "problems": list(problems), "metric": metric}


def bench(speedup=(1.5, 1.4, 1.6), cand_ms=2.0, skipped=None):
    entry = {"skipped": skipped, "models": [{"latency": {"median_ms": 3.0}}, {"latency": {"median_ms": cand_ms}}],
             "ratio": {"speedup": speedup[0], "ci_low": speedup[1], "ci_high": speedup[2], "pairs": 100}}
    return {"providers": {"cpu": entry}}


# ---------------------------------------------------------------- decide (pure)


def test_decide_passes_and_fails_in_both_directions():
    budgets = {"min_cosine": 0.999, "max_abs_error": 0.05, "min_sqnr_db": 30, "max_size_mb": 1.0}
    ok = gate.decide(budgets, {"drift": drift(), "size": {"candidate_bytes": 500_000}})
    assert ok and [c.name for c in ok.checks] == [
        "finite_outputs", "outputs_match", "min_cosine", "max_abs_error", "min_sqnr_db", "max_size_mb"]
    bad = gate.decide(budgets, {"drift": drift(cosine=0.99, sqnr=12.0), "size": {"candidate_bytes": 2_000_000}})
    assert not bad
    assert {c.name for c in bad.failures} == {"min_cosine", "min_sqnr_db", "max_size_mb"}
    assert "0.99 < 0.999" in next(c.message for c in bad.failures if c.name == "min_cosine")


def test_nan_and_mismatch_always_fail_even_without_budgets():
    result = gate.decide({}, {"drift": drift(nonfinite=3)})
    assert [c.name for c in result.failures] == ["finite_outputs"]
    result = gate.decide({}, {"drift": drift(problems=["the candidate has no output 'y'"])})
    assert [c.name for c in result.failures] == ["outputs_match"]


def test_unmeasured_budgets_fail():
    result = gate.decide({"min_top5_agreement": 0.9, "max_metric_drop": 0.01, "min_speedup": 1.0},
                         {"drift": drift()})
    msgs = {c.name: c.message for c in result.failures}
    assert "classifier" in msgs["min_top5_agreement"]
    assert "metric" in msgs["max_metric_drop"]
    assert "not measured" in msgs["min_speedup"]


def test_speed_budgets_per_provider_use_the_interval_lower_end():
    measurements = {"drift": drift(), "bench": bench(speedup=(1.3, 1.1, 1.5), cand_ms=2.0)}
    assert gate.decide({"min_speedup": 1.05, "max_latency_ms": {"cpu": 2.5}}, measurements)
    result = gate.decide({"min_speedup": 1.2, "max_latency_ms": {"cpu": 1.5, "cuda": 1.0}}, measurements)
    assert {c.name for c in result.failures} == {"min_speedup.cpu", "max_latency_ms.cpu", "max_latency_ms.cuda"}
    assert "not benchmarked" in next(c.message for c in result.failures if c.name == "max_latency_ms.cuda")
    skipped = {"drift": drift(), "bench": bench(skipped="CUDAExecutionProvider is not available")}
    assert not gate.decide({"max_latency_ms": 10}, skipped)


def test_metric_drop():
    metric = {"name": "accuracy", "reference": 0.9, "candidate": 0.88, "drop": 0.02}
    assert gate.decide({"max_metric_drop": 0.03}, {"drift": drift(metric=metric)})
    assert not gate.decide({"max_metric_drop": 0.01}, {"drift": drift(metric=metric)})


def test_junit_xml_parses_with_the_right_counts():
    result = gate.decide({"min_cosine": 0.999, "min_sqnr_db": 30, "max_abs_error": 1.0},
                         {"drift": drift(cosine=0.9, sqnr=10.0)})
    root = ET.fromstring(result.to_junit())
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == int(suite.get("tests")) == 5  # 2 built-in checks + 3 budgets
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["min_cosine", "min_sqnr_db"]
    assert suite.get("failures") == root.get("failures") == "2"
    assert "0.9 < 0.999" in cases[2].find("failure").get("message")


def test_markdown_summary():
    md = gate.decide({"min_cosine": 0.999}, {"drift": drift(cosine=0.5)}).to_markdown("gate")
    assert md.startswith("### gate: FAILED (1 of 3 checks)")
    assert "| `min_cosine` | 0.999 | 0.5 | **FAIL** |" in md


def test_gate_imports_no_runtime():
    code = "import sys, onnxshrink.gate; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------- config


def test_config_found_upward_from_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[tool.onnxshrink.gate]\nmin_cosine = 0.99\nmax_latency_ms.cpu = 5\n'
        'providers = ["cpu", "cuda"]\n')
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    config = gate.load_config(start=nested)
    assert config.budgets == {"min_cosine": 0.99, "max_latency_ms": {"cpu": 5.0}}
    assert config.settings == {"providers": "cpu,cuda"}
    assert config.source == str(tmp_path / "pyproject.toml")
    (nested / "onnxshrink.toml").write_text("[gate]\nmin_cosine = 0.5\n")
    assert gate.load_config(start=nested).budgets == {"min_cosine": 0.5}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[gate]\nmin_cosinus = 0.9\n", "unknown gate key 'min_cosinus'"),
        ("[gate]\nmin_cosine = 'high'\n", "must be a number"),
        ("[gate]\nmin_cosine = {cpu = 1}\n", "takes one number"),
        ("[gate]\nmax_latency_ms.gpu = 1\n", "unknown provider"),
        ("[gate]\nruns = 'many'\n", "runs must be int"),
        ("[gate\n", "cannot read this TOML"),
        ("[other]\nx = 1\n", "no [gate] table"),
    ],
)
def test_bad_config_is_rejected(tmp_path, text, message):
    path = tmp_path / "onnxshrink.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        gate.load_config(path)


def test_overrides():
    base = gate.GateConfig({"min_cosine": 0.9, "max_latency_ms": {"cpu": 5.0}}, {}, None)
    out = gate.apply_overrides(base, ["min_cosine=0.999", "max_latency_ms.cuda=1", "runs=7"])
    assert out.budgets == {"min_cosine": 0.999, "max_latency_ms": {"cpu": 5.0, "cuda": 1.0}}
    assert out.settings == {"runs": 7}
    assert base.budgets["max_latency_ms"] == {"cpu": 5.0}  # the input is not changed
    for bad, message in [("nope=1", "unknown gate key"), ("min_cosine", "KEY=VALUE"),
                         ("min_cosine=x", "must be a number"), ("min_cosine.cpu=1", "takes one number")]:
        with pytest.raises(ConfigError, match=message):
            gate.apply_overrides(base, [bad])


# ---------------------------------------------------------------- CLI: faithful and damaged models


@pytest.fixture
def models(tmp_path, zoo_model):
    ref = zoo_model("plain_cnn")
    proto = onnx.load(ref)
    damaged = tmp_path / "damaged.onnx"
    for t in proto.graph.initializer:  # scale one weight (the first conv's) by 3
        w = numpy_helper.to_array(t)
        if w.ndim == 4:
            t.CopyFrom(numpy_helper.from_array(w * 3, t.name))
            break
    onnx.save(proto, damaged)
    faithful = tmp_path / "faithful.onnx"
    onnx.save(onnx.load(ref), faithful)
    return str(ref), str(faithful), str(damaged)


def test_check_passes_on_a_faithful_model_and_fails_on_a_damaged_one(models, tmp_path, monkeypatch):
    ref, faithful, damaged = models
    cfg = tmp_path / "onnxshrink.toml"
    cfg.write_text("[gate]\nmin_cosine = 0.9999\nmin_sqnr_db = 30\nmax_size_mb = 10\ncount = 3\nthreads = 1\n")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    args = ["check", ref, "--config", str(cfg), "--shape", "N=2"]
    out_json, junit = tmp_path / "gate.json", tmp_path / "gate.xml"
    assert main([*args[:2], faithful, *args[2:], "--json", str(out_json), "--junit", str(junit)]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["passed"] and doc["failures"] == 0 and doc["config"] == str(cfg)
    assert ET.parse(junit).getroot().get("failures") == "0"
    assert main([*args[:2], damaged, *args[2:], "--json", str(out_json), "--junit", str(junit)]) == 1
    doc = json.loads(out_json.read_text())
    assert {c["name"] for c in doc["checks"] if not c["passed"]} == {"min_cosine", "min_sqnr_db"}
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "2" and len(suite.findall("testcase")) == 5
    text = summary.read_text()
    assert text.count("### onnxshrink check") == 2 and "FAILED (2 of 5 checks)" in text


def test_check_exit_code_2_on_usage_and_input_errors(models, tmp_path, capsys):
    ref, faithful, _ = models
    assert main(["check", ref, faithful, "--set", "min_cosinus=0.9"]) == 2
    assert "unknown gate key" in capsys.readouterr().err
    assert main(["check", ref, str(tmp_path / "nope.onnx")]) == 2
    assert main(["check", ref, faithful, "--config", str(tmp_path / "nope.toml")]) == 2
    bad_data = tmp_path / "bad.npz"
    np.savez(bad_data, input=np.ones((2, 3, 32, 32), np.float64))
    assert main(["check", ref, faithful, "--data", str(bad_data)]) == 2
    assert "input 'input' has dtype float64" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["check", ref])
    assert e.value.code == 2


def test_check_with_a_speed_budget_and_a_metric_on_labeled_data(models, tmp_path):
    ref, faithful, _ = models
    data = tmp_path / "val.npz"
    rng = np.random.default_rng(0)
    np.savez(data, input=rng.standard_normal((3, 3, 32, 32)).astype(np.float32), labels=np.array([1, 2, 3]))
    junit, out = tmp_path / "gate.xml", tmp_path / "gate.json"
    # min_speedup 0 and a huge latency budget hold whatever the timing: the test checks plumbing only
    rc = main(["check", ref, faithful, "--data", str(data), "--metric", "accuracy", "--max-metric-drop", "0",
               "--threads", "1", "--runs", "3", "--warmup", "1", "--min-speedup", "0",
               "--set", "max_latency_ms.cpu=1e9", "--junit", str(junit), "--json", str(out)])
    assert rc == 0
    names = [c.get("name") for c in ET.parse(junit).getroot().iter("testcase")]
    assert names == ["finite_outputs", "outputs_match", "max_metric_drop", "min_speedup.cpu", "max_latency_ms.cpu"]
    doc = json.loads(out.read_text())
    assert doc["measurements"]["drift"]["metric"]["drop"] == 0
    assert doc["measurements"]["bench"]["feed"] == {"input": [1, 3, 32, 32]}


@pytest.mark.parametrize("key,value", [("min_worst_feed_cosine", 1.1), ("min_cosine", -2), ("max_rel_error", -1),
                                       ("min_top1_agreement", 1.5), ("max_latency_ms", 0)])
def test_budgets_no_measurement_can_meet_are_refused(key, value, tmp_path):
    """A limit outside what the measurement can take (a cosine above 1, a negative error) was accepted
    and the gate failed with exit 1, the code for 'the model broke the budget'; it is a config error."""
    with pytest.raises(ConfigError, match="is outside"):
        gate.split_config({key: value})
    cfg = tmp_path / "gate.toml"
    cfg.write_text(f"[gate]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=key):
        gate.load_config(cfg)
    gate.split_config({key: 0.5 if "agreement" in key or "cosine" in key else 1.0})  # in range: accepted


def test_metric_budget_without_a_metric_is_a_config_error(tmp_path, capsys):
    """--max-metric-drop with no metric could only fail as 'not measured' (exit 1: 'the model broke the
    budget'); it is bad input (exit 2), said before anything runs."""
    from models import zoo

    src = str(zoo.save("mlp", tmp_path))
    assert main(["check", src, src, "--max-metric-drop", "0.1"]) == 2
    assert "max_metric_drop needs a task metric" in capsys.readouterr().err
