"""``fuse_activations``: written-out hard-swish -> HardSwish (opset >= 14) or x * HardSigmoid(x)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxshrink import model_io, pipeline
from tests.test_fusions import F16, F32, build, ops, run_pass

_CONSTS = {"three": np.array(3.0, F32), "zero": np.array(0.0, F32), "six": np.array(6.0, F32),
           "sixth": np.array(1 / 6, F32)}


def _hardswish(form: str, x: str = "x", out: str = "h") -> list:
    """The written-out hard-swish of ``x`` in one of the forms exporters use."""
    clip = [helper.make_node("Add", ["three", x] if form == "swapped" else [x, "three"], [f"{out}_a"]),
            helper.make_node("Clip", [f"{out}_a", "zero", "six"], [f"{out}_c"])]
    if form in ("div", "swapped"):
        return clip + [helper.make_node("Mul", [f"{out}_c", x] if form == "swapped" else [x, f"{out}_c"],
                                        [f"{out}_m"]),
                       helper.make_node("Div", [f"{out}_m", "six"], [out])]
    if form == "mul_sixth":
        return clip + [helper.make_node("Mul", [x, f"{out}_c"], [f"{out}_m"]),
                       helper.make_node("Mul", ["sixth", f"{out}_m"], [out])]
    if form == "gate_div":
        return clip + [helper.make_node("Div", [f"{out}_c", "six"], [f"{out}_g"]),
                       helper.make_node("Mul", [x, f"{out}_g"], [out])]
    raise ValueError(form)


def _model(nodes, opset, dtype=F32, shape=(2, 3, 4, 4)):
    consts = {k: v.astype(dtype) for k, v in _CONSTS.items()}
    return build([helper.make_node("Neg", ["in"], ["x"]), *nodes, helper.make_node("Neg", ["h"], ["y"])],
                 [("in", dtype, list(shape))], [("y", dtype, list(shape))], consts, opset=opset)


def _scaled_feed_run(proto, dtype=F32):
    return run_pass(proto, "fuse_activations", dtype)


@pytest.mark.parametrize("form", ["div", "swapped", "mul_sixth", "gate_div"])
@pytest.mark.parametrize("opset", [12, 18])
def test_hardswish_forms_fused(form, opset):
    model, stats = _scaled_feed_run(_model(_hardswish(form), opset))
    assert stats.counts["hardswish_fused"] == 1
    assert ops(model) == (["Neg", "HardSwish", "Neg"] if opset >= 14 else ["Neg", "HardSigmoid", "Mul", "Neg"])


def test_hardsigmoid_form_becomes_hardswish_from_opset_14_only():
    nodes = [helper.make_node("HardSigmoid", ["x"], ["s"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["x", "s"], ["h"])]
    model, stats = _scaled_feed_run(_model(nodes, 14))
    assert stats.counts["hardswish_fused"] == 1 and ops(model) == ["Neg", "HardSwish", "Neg"]
    model, stats = _scaled_feed_run(_model(nodes, 13))
    assert not stats.counts and ops(model) == ["Neg", "HardSigmoid", "Mul", "Neg"]


def test_hardswish_float16_and_old_clip_attributes():
    model, stats = _scaled_feed_run(_model(_hardswish("div"), 18, F16), F16)
    assert stats.counts["hardswish_fused"] == 1
    nodes = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a"], ["c"], min=0.0, max=6.0),
             helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["h"])]
    model, stats = _scaled_feed_run(_model(nodes, 10))
    assert stats.counts["hardswish_fused"] == 1 and ops(model) == ["Neg", "HardSigmoid", "Mul", "Neg"]


@pytest.mark.parametrize("case", ["bounds", "offset", "other_x", "shared", "enlarging"])
def test_not_hardswish_kept(case):
    nodes = _hardswish("div")
    outputs = [("y", F32, [2, 3, 4, 4])]
    consts = dict(_CONSTS)
    if case == "bounds":
        consts["six"] = np.array(5.0, F32)  # Clip(x+3, 0, 5) / 5: another function
    elif case == "offset":
        consts["three"] = np.array(2.0, F32)
    elif case == "other_x":  # z * Clip(x + 3, 0, 6) / 6
        nodes[2] = helper.make_node("Mul", ["in", "h_c"], ["h_m"])
    elif case == "shared":  # the Clip output is read elsewhere too
        nodes.append(helper.make_node("Relu", ["h_c"], ["z"]))
        outputs.append(("z", F32, [2, 3, 4, 4]))
    elif case == "enlarging":  # a [1,1,1,1,1] six would make the result rank 5
        consts["six5"] = np.full((1, 1, 1, 1, 1), 6.0, F32)
        nodes[3] = helper.make_node("Div", ["h_m", "six5"], ["h"])
        outputs = [("y", F32, [1, 2, 3, 4, 4])]
    proto = build([helper.make_node("Neg", ["in"], ["x"]), *nodes, helper.make_node("Neg", ["h"], ["y"])],
                  [("in", F32, [2, 3, 4, 4])], outputs, consts, opset=18)
    model, stats = _scaled_feed_run(proto)
    assert not stats.counts and "HardSwish" not in ops(model)


def test_default_preset_fuses_but_lossless_loop_does_not():
    proto = _model(_hardswish("div"), 12)
    fused, plain = model_io.load(proto), model_io.load(proto)
    pipeline.Pipeline(pipeline.preset_steps("default")).run(fused)
    pipeline.Pipeline(pipeline.lossless_steps()).run(plain)
    assert "HardSigmoid" in ops(fused) and "Clip" in ops(plain)
    onnx.checker.check_model(onnx.load_from_string(model_io.to_bytes(fused)))


# ---------------------------------------------------------------- GELU (erf form) -> Gelu


_GELU_CONSTS = {"sqrt2": np.array(np.sqrt(2.0), F32), "rsqrt2": np.array(1 / np.sqrt(2.0), F32),
                "one": np.array(1.0, F32), "half": np.array(0.5, F32)}


def _gelu(form: str, x: str = "x", out: str = "h") -> list:
    """The written-out GELU of ``x`` as exporters write it (Paddle, PyTorch, TensorFlow groupings)."""
    scale = (helper.make_node("Mul", [x, "rsqrt2"], ["g_s"]) if form == "rsqrt"
             else helper.make_node("Div", [x, "sqrt2"], ["g_s"]))
    gate = [scale, helper.make_node("Erf", ["g_s"], ["g_e"]),
            helper.make_node("Add", ["one", "g_e"] if form == "half_first" else ["g_e", "one"], ["g_a"])]
    if form == "half_first":  # (x * 0.5) * (1 + erf(x / sqrt2)): PyTorch's nn.GELU written out
        return gate + [helper.make_node("Mul", [x, "half"], ["g_m"]), helper.make_node("Mul", ["g_m", "g_a"], [out])]
    if form == "half_gate":  # x * (gate * 0.5)
        return gate + [helper.make_node("Mul", ["g_a", "half"], ["g_m"]), helper.make_node("Mul", [x, "g_m"], [out])]
    return gate + [helper.make_node("Mul", [x, "g_a"], ["g_m"]), helper.make_node("Mul", ["g_m", "half"], [out])]


def _gelu_model(nodes, opset, dtype=F32, outputs=None, consts=None):
    consts = {k: v.astype(dtype) for k, v in (consts or _GELU_CONSTS).items()}
    shape = [2, 3, 4, 4]
    return build([helper.make_node("Neg", ["in"], ["x"]), *nodes, helper.make_node("Neg", ["h"], ["y"])],
                 [("in", dtype, shape)], outputs or [("y", dtype, shape)], consts, opset=opset)


@pytest.mark.parametrize("form", ["paddle", "rsqrt", "half_first", "half_gate"])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_gelu_forms_fused_at_opset_20(form, dtype):
    model, stats = run_pass(_gelu_model(_gelu(form), 20, dtype), "fuse_activations", dtype)
    assert stats.counts["gelu_fused"] == 1 and ops(model) == ["Neg", "Gelu", "Neg"]
    gelu = next(n for n in model.graph if n.op_type == "Gelu")
    assert gelu.attributes.get_string("approximate", "none") == "none"


def test_gelu_left_below_opset_20_and_noted():
    model, stats = run_pass(_gelu_model(_gelu("paddle"), 18), "fuse_activations")
    assert not stats.counts and "Gelu" not in ops(model) and stats.notes["gelu_needs_opset_20"] == 1


@pytest.mark.parametrize("case", ["half", "sqrt", "one", "other_x", "shared"])
def test_not_gelu_kept(case):
    consts, nodes, outputs = dict(_GELU_CONSTS), _gelu("paddle"), None
    if case in ("half", "sqrt", "one"):  # x * 0.6 * ..., erf(x / 1.5), erf(.) + 2: other functions
        consts[{"half": "half", "sqrt": "sqrt2", "one": "one"}[case]] = np.array(
            {"half": 0.6, "sqrt": 1.5, "one": 2.0}[case], F32)
    elif case == "other_x":  # in * (1 + erf(x / sqrt2)) * 0.5
        nodes[3] = helper.make_node("Mul", ["in", "g_a"], ["g_m"])
    elif case == "shared":  # the Erf output is read elsewhere too
        nodes.append(helper.make_node("Relu", ["g_e"], ["z"]))
        outputs = [("y", F32, [2, 3, 4, 4]), ("z", F32, [2, 3, 4, 4])]
    model, stats = run_pass(_gelu_model(nodes, 20, outputs=outputs, consts=consts), "fuse_activations")
    assert not stats.counts and "Gelu" not in ops(model)


def test_gelus_left_below_opset_20_are_reported():
    """The default preset on an opset-18 model says how many GELUs it left and why."""
    from onnxshrink import report

    model = model_io.load(_gelu_model(_gelu("paddle"), 18))
    result = pipeline.Pipeline(pipeline.preset_steps("default")).run(model)
    row = result.per_pass()["fuse_activations"]
    assert row["left"] == {"gelu_needs_opset_20": 1} and not row["counts"]
    assert "left: gelu_needs_opset_20=1" in report.pass_table(result.per_pass())


def test_optimize_opset_option_upgrades_so_gelu_fuses(tmp_path, capsys):
    """``optimize --opset 20`` converts an opset-11 model first, so its written-out GELU becomes Gelu;
    asking for an opset below the model's is refused (exit 2), never a downgrade."""
    from onnxshrink import api, cli
    from tests.lossless import ort_outputs

    src = tmp_path / "gelu11.onnx"
    proto = _gelu_model(_gelu("half_first"), 11)
    onnx.save(proto, src)
    result = api.optimize(src, tmp_path / "o.onnx", opset=20)
    assert result.opset_upgraded_from == 11 and result.to_dict()["opset_upgraded_from"] == 11
    saved = onnx.load(tmp_path / "o.onnx")
    assert saved.opset_import[0].version == 20 and [n.op_type for n in saved.graph.node].count("Gelu") == 1
    feed = {"in": np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(F32)}
    np.testing.assert_allclose(ort_outputs(saved, feed)[0], ort_outputs(proto, feed)[0], rtol=1e-5, atol=1e-6)
    assert cli.main(["optimize", str(src), "-o", str(tmp_path / "c.onnx"), "--opset", "20"]) == 0
    assert "opset 11 -> 20" in capsys.readouterr().out
    assert cli.main(["optimize", str(src), "-o", str(tmp_path / "d.onnx"), "--opset", "9"]) == 2
    assert "converts opsets up, never down" in capsys.readouterr().err
