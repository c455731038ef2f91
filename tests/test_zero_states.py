"""Rule 18 of ``eliminate_identities``: recurrent ops' all-zero initial states are dropped."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import model_io
from onnxshrink.pipeline import make_pass
from tests import lossless
from tests.conftest import fetch_or_skip

HIDDEN, FEAT, T = 4, 3, 5


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _recurrent(op: str, state_nodes: list, states: list[str], extra_inits=(), extra_inputs=()) -> onnx.ModelProto:
    """x [T, N, FEAT] -> op (one direction, HIDDEN units) -> Y; ``states`` name its state inputs."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    rng = np.random.default_rng(0)
    inits = [
        _init("W", rng.normal(size=(1, gates * HIDDEN, FEAT)).astype(np.float32)),
        _init("R", rng.normal(size=(1, gates * HIDDEN, HIDDEN)).astype(np.float32)),
        _init("B", rng.normal(size=(1, 2 * gates * HIDDEN)).astype(np.float32)),
        *extra_inits,
    ]
    rec = helper.make_node(op, ["x", "W", "R", "B", "", *states], ["Y"], hidden_size=HIDDEN)
    graph = helper.make_graph(
        [*state_nodes, rec], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, "N", FEAT]), *extra_inputs],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [T, 1, "N", HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tf2onnx_zeros(name: str) -> list:
    """The run-time zeros tf2onnx writes: Shape -> Slice (batch) -> Concat -> Expand(0) -> Unsqueeze."""
    return [
        helper.make_node("Shape", ["x"], [f"{name}_s"]),
        helper.make_node("Slice", [f"{name}_s", "one", "two"], [f"{name}_n"]),
        helper.make_node("Concat", [f"{name}_n", "hidden"], [f"{name}_shape"], axis=0),
        helper.make_node("Cast", ["zero", ], [f"{name}_z"], to=TensorProto.FLOAT),
        helper.make_node("Expand", [f"{name}_z", f"{name}_shape"], [f"{name}_2d"]),
        helper.make_node("Unsqueeze", [f"{name}_2d", "zero_axis"], [name]),
    ]


_TF_INITS = [_init("one", np.array([1], np.int64)), _init("two", np.array([2], np.int64)),
             _init("hidden", np.array([HIDDEN], np.int64)), _init("zero", np.array(0.0, np.float32)),
             _init("zero_axis", np.array([0], np.int64))]


def _run(model: onnx.ModelProto):
    return lossless.run_pass(model, "eliminate_identities", dims={"N": 3})


def test_lstm_tf2onnx_zero_states_dropped_and_chain_left_to_dead_code():
    model, stats = _run(_recurrent("LSTM", _tf2onnx_zeros("h0"), ["h0", "h0"], _TF_INITS))
    assert stats.counts["zero_states_dropped"] == 2
    lstm = next(n for n in model.graph if n.op_type == "LSTM")
    assert len(lstm.inputs) == 4  # X, W, R, B: the trailing empty inputs are trimmed
    make_pass("dead_code")(model)
    assert lossless.ops(model.graph) == ["LSTM"]


def test_gru_constant_of_shape_and_rnn_constant_zeros():
    zeros = [helper.make_node("ConstantOfShape", ["h_shape"], ["h0"])]  # no value: float 0
    inits = [_init("h_shape", np.array([1, 3, HIDDEN], np.int64))]
    _, stats = _run(_recurrent("GRU", zeros, ["h0"], inits))
    assert stats.counts["zero_states_dropped"] == 1
    model, stats = _run(_recurrent("RNN", [], ["h0"], [_init("h0", np.zeros((1, 3, HIDDEN), np.float32))]))
    assert stats.counts["zero_states_dropped"] == 1
    assert len(next(n for n in model.graph if n.op_type == "RNN").inputs) == 4


@pytest.mark.parametrize("case", ["graph_input", "nonzero", "arithmetic", "nan"])
def test_states_not_proven_zero_are_kept(case):
    """A state that is an input, nonzero, made by arithmetic (0 * inf is NaN), or NaN stays."""
    nodes, inits, inputs = [], [], []
    if case == "graph_input":
        inputs = [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "N", HIDDEN])]
    elif case == "nonzero":
        nodes = [helper.make_node("ConstantOfShape", ["h_shape"], ["h0"],
                                  value=numpy_helper.from_array(np.array([0.5], np.float32)))]
        inits = [_init("h_shape", np.array([1, 3, HIDDEN], np.int64))]
    elif case == "arithmetic":
        nodes = [helper.make_node("Mul", ["z", "big"], ["h0"])]
        inits = [_init("z", np.zeros((1, 3, HIDDEN), np.float32)),
                 _init("big", np.full((1, 3, HIDDEN), 1e30, np.float32))]
    else:
        inits = [_init("h0", np.full((1, 3, HIDDEN), np.nan, np.float32))]
    proto = _recurrent("LSTM", nodes, ["h0"], inits, inputs)
    model = model_io.load(proto)
    stats = make_pass("eliminate_identities")(model).stats
    assert "zero_states_dropped" not in stats.counts
    assert next(n for n in model.graph if n.op_type == "LSTM").inputs[5] is not None


@pytest.mark.realmodel
def test_real_ddddocr_lstm_outputs_unchanged():
    """ddddocr's recognizer builds its LSTM's zero states with ConstantOfShape at run time."""
    path = fetch_or_skip("ddddocr_ocr")
    proto = onnx.load(path)
    model = model_io.load(proto)
    assert make_pass("eliminate_identities")(model).stats.counts["zero_states_dropped"] == 2
    feed = {"input1": np.random.default_rng(0).random((1, 1, 64, 120), dtype=np.float32)}
    for w, g in zip(lossless.ort_outputs(proto, feed), lossless.ort_outputs(model_io.to_bytes(model), feed)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
