"""The command line: summaries, JSON reports, exit codes on bad input, help and version."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import onnx
import pytest

from onnxshrink import __version__, cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_bundled_model_prints_summary_and_writes_json(tmp_path, capsys):
    out = tmp_path / "demo.opt.onnx"
    report = tmp_path / "r.json"
    code, stdout, _ = run(capsys, "optimize", "-o", str(out), "--report", str(report))
    assert code == 0
    for field in ("nodes", "parameters", "weight bytes", "file bytes", "MACs", "pass", "ms"):
        assert field in stdout
    onnx.checker.check_model(onnx.load(out))
    data = json.loads(report.read_text())
    assert data["output"] == str(out)
    assert {"nodes", "ops", "parameters", "initializer_bytes", "file_bytes", "macs"} <= set(data["before"])
    assert data["after"]["nodes"] <= data["before"]["nodes"]
    assert "dead_code" in data["passes"]
    assert all("seconds" in row for row in data["passes"].values())


def test_optimize_counts_macs_at_the_given_shape(tmp_path, capsys):
    """``--shape`` sizes the summary's MACs for the lossless and quantize paths too, not only pruning's
    (it was accepted and ignored there: symbolic height and width counted as 1)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    src = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    report = tmp_path / "r.json"
    code, _, _ = run(capsys, "optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--shape", "x:2=4",
                     "--shape", "W=5", "--report", str(report))
    assert code == 0
    data = json.loads(report.read_text())
    assert data["before"]["macs"] == data["after"]["macs"] == 8 * 3 * 4 * 5


def test_options_of_a_mode_not_asked_for_are_refused(tmp_path, capsys):
    """``--reconstruct`` or ``--equalize`` without ``--prune``/``--quantize`` used to be ignored: the
    model was optimized losslessly and the user believed it pruned or quantized. Nothing is written."""
    out = tmp_path / "o.onnx"
    code, _, err = run(capsys, "optimize", "-o", str(out), "--reconstruct", "--round-to", "8", "--equalize")
    assert code == 2 and not out.exists()
    assert "--reconstruct, --round-to apply only with --prune" in err and "--equalize applies only with --quantize" in err
    code, _, err = run(capsys, "optimize", "-o", str(out), "--calibration", str(tmp_path))
    assert code == 2 and "--calibration applies only with --quantize or --prune" in err
    code, _, _ = run(capsys, "optimize", "-o", str(out), "--shape", "batch=2")  # --shape serves every mode
    assert code == 0 and out.exists()


@pytest.mark.parametrize("spec, message", [
    ("N=2", "no input has a dim named 'N' (named dims: batch"),
    ("input:7=2", "input 'input' has 4 axes"),
    ("input:1=4", "axis 1 of input 'input' is fixed at 3"),
])
def test_shape_that_sizes_nothing_is_refused(spec, message, tmp_path, capsys):
    """A misspelt ``--shape`` used to be ignored: MACs and random feeds stayed at 1 without a word."""
    for argv in (("optimize", "-o", str(tmp_path / "o.onnx")), ("inspect", str(cli.bundled_model()))):
        code, _, err = run(capsys, *argv, "--shape", spec)
        assert code != 0 and message in err, (argv, err)


def test_optimize_with_pass_list_and_check_each(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    shutil.copy(cli.bundled_model(), src)
    code, stdout, _ = run(capsys, "optimize", str(src), "-o", str(tmp_path / "o.onnx"),
                          "--passes", "dead_code", "--check-each")
    assert code == 0 and "dead_code" in stdout


def test_optimize_refuses_to_overwrite_input(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    shutil.copy(cli.bundled_model(), src)
    before = src.read_bytes()
    code, _, err = run(capsys, "optimize", str(src), "-o", str(src))
    assert code == 2 and "input model" in err
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    "content, args, message",
    [
        (b"garbage bytes", ["optimize"], "not an ONNX model"),
        (None, ["optimize"], "no such file"),
        (b"garbage bytes", ["inspect"], "not an ONNX model"),
    ],
)
def test_bad_input_exits_2(tmp_path, capsys, content, args, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run(capsys, *args, str(path))
    assert code == 2
    assert message in err


def test_unknown_pass_and_preset_exit_2(capsys):
    code, _, err = run(capsys, "optimize", "--passes", "nope")
    assert code == 2 and "unknown pass" in err
    code, _, err = run(capsys, "optimize", "--preset", "nope")
    assert code == 2 and "unknown preset" in err


def test_inspect(tmp_path, capsys):
    js = tmp_path / "i.json"
    code, stdout, _ = run(capsys, "inspect", str(cli.bundled_model()), "--json", str(js))
    assert code == 0
    assert "IR version 8" in stdout and "Conv" in stdout and "MACs" in stdout
    info = json.loads(js.read_text())
    assert info["inputs"][0]["name"] == "input"
    assert info["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert info["ops"]["Conv"] == 2
    assert info["macs"] > 1_000_000
    assert info["opset_imports"] == {"": 17}


def test_list_passes(capsys):
    code, stdout, _ = run(capsys, "optimize", "--list-passes")
    assert code == 0 and "dead_code" in stdout and "presets:" in stdout


def test_version_via_console_script():
    exe = shutil.which("onnxshrink") or None
    cmd = [exe] if exe else [sys.executable, "-m", "onnxshrink.cli"]
    res = subprocess.run([*cmd, "--version"], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and __version__ in res.stdout


@pytest.mark.parametrize("sub", [[], *([name] for name in cli.COMMANDS)])
def test_help_everywhere(capsys, sub):
    with pytest.raises(SystemExit) as exc:
        cli.main([*sub, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_report_paths_are_checked_before_any_work(tmp_path, capsys):
    """--report/--json/--junit/--markdown/--plan-out into a missing folder ended in a traceback (exit 1,
    which a CI gate reads as 'budget failed'), after the model was written; a --plan-in that is not a
    JSON object did too. All are now bad input (exit 2), found before any work."""
    from models import zoo
    from onnxshrink.cli import main

    src = str(zoo.save("mlp", tmp_path))
    out = tmp_path / "o.onnx"
    missing = str(tmp_path / "nowhere" / "r.json")
    runs = [["optimize", src, "-o", str(out), "--report", missing],
            ["inspect", src, "--json", missing],
            ["validate", src, src, "--json", missing],
            ["check", src, src, "--junit", missing],
            ["optimize", src, "-o", str(out), "--prune", "0.5", "--plan-out", missing],
            ["optimize", src, "-o", str(out), "--report", src]]
    for argv in runs:
        assert main(argv) == 2, argv
        assert "onnxshrink: error:" in capsys.readouterr().err
        assert not out.exists()
    for content in (b"[1, 2]", b"\x89\xf6\x00 not text"):
        plan = tmp_path / "plan.json"
        plan.write_bytes(content)
        assert main(["optimize", src, "-o", str(out), "--plan-in", str(plan)]) == 2
        assert "pruning plan" in capsys.readouterr().err


def test_every_mode_option_is_refused_without_its_mode():
    """``cli.ONLY_WITH`` is kept by hand: an option added to the quantization, recovery or pruning groups
    and not listed there would be ignored without a word when its mode is off. The mode switches
    themselves and ``--shape`` (it sizes every mode's MACs) are the only exceptions."""
    parser = cli.build_parser()
    optimize = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["optimize"]
    titles = ("int8 quantization", "accuracy recovery", "structured channel pruning")
    dests = {a.dest for g in optimize._action_groups if (g.title or "").startswith(titles) for a in g._group_actions}
    listed = {d for ds in cli.ONLY_WITH.values() for d in ds}
    assert dests - {"quantize", "prune", "plan_in", "shape"} <= listed, sorted(dests - listed)
    assert len(dests) > 25  # the groups were found
