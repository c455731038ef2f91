"""The default preset on a 20,000-node chain: handled in a counted, size-independent number of shape
inferences and fixed-point iterations (no timing: a quadratic pass shows up as a test that never ends,
and the counts catch inference per node or per rewrite)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import model_io
from onnxshrink.pipeline import Pipeline, preset_steps
from tests.conftest import check_close
from tests.lossless import ort_outputs

#: One period of the chain: what stays (Relu, Neg, Tanh, the Shape-fed Reshape folded to a constant
#: shape) and what goes (Identity, Mul by 1, Add of 0, Cast to float, Reshape to the same shape).
_PERIOD = ("Relu", "Identity", "MulOne", "Neg", "AddZero", "Cast", "SameReshape", "Tanh", "ShapeReshape")


def _chain(n: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([0, 8], np.int64), "same"),
             numpy_helper.from_array(np.array([0, 4, 2], np.int64), "split3")]
    nodes, cur = [], "x"
    for i in range(n):
        kind, out = _PERIOD[i % len(_PERIOD)], f"v{i}"
        if kind == "MulOne":
            nodes.append(helper.make_node("Mul", [cur, "one"], [out]))
        elif kind == "AddZero":
            nodes.append(helper.make_node("Add", ["zero", cur], [out]))
        elif kind == "Cast":
            nodes.append(helper.make_node("Cast", [cur], [out], to=TensorProto.FLOAT))
        elif kind == "SameReshape":
            nodes.append(helper.make_node("Reshape", [cur, "same"], [out]))
        elif kind == "ShapeReshape":  # [N,8] -> [N,4,2] -> Shape -> back to [N,8] by its own shape
            nodes += [helper.make_node("Reshape", [cur, "split3"], [f"r{i}"]),
                      helper.make_node("Shape", [cur], [f"s{i}"]),
                      helper.make_node("Reshape", [f"r{i}", f"s{i}"], [out])]
        else:
            nodes.append(helper.make_node(kind, [cur], [out]))
        cur = out
    nodes.append(helper.make_node("Relu", [cur], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_default_preset_on_20000_node_chain_counts_inferences(monkeypatch):
    calls = []
    real = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda *a, **k: calls.append(1) or real(*a, **k))
    proto = _chain(20_000)
    assert len(proto.graph.node) > 20_000
    model = model_io.load(proto)
    report = Pipeline(preset_steps("default")).run(model)
    kept = [n.op_type for n in model.graph]
    periods = 20_000 // len(_PERIOD)
    assert kept.count("Relu") == periods + 2 and kept.count("Neg") == periods and kept.count("Tanh") == periods
    assert kept.count("Reshape") == 2 * periods and "Shape" not in kept  # Shape folded into copy dims
    assert len(kept) == 5 * periods + 2
    # inference runs a bounded number of times, not per node, per rewrite or per pass
    assert len(calls) <= 3, len(calls)
    assert max(report.iterations.values()) <= 2
    feed = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    check_close(ort_outputs(model_io.to_bytes(model), feed), ort_outputs(proto, feed))
