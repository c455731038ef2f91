"""MACs counting where onnx shape inference cannot follow the shape arithmetic."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink import stats


def _computed_reshape() -> ir.Model:
    """x [1,64] -> Reshape to Max([1,16,4], [1,8,4]) = [1,16,4] -> Conv1d 16->8, k=3: output [1,8,2],
    768 MACs. Inference does not evaluate the Max, so the conv's length is unresolved before folding."""
    w = numpy_helper.from_array(np.ones((8, 16, 3), np.float32), "w")
    a = numpy_helper.from_array(np.array([1, 16, 4], np.int64), "a")
    b = numpy_helper.from_array(np.array([1, 8, 4], np.int64), "b")
    nodes = [helper.make_node("Max", ["a", "b"], ["shape"]), helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, a, b])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_unresolved_shapes_are_counted_on_the_folded_model():
    model = _computed_reshape()
    assert stats.macs(model, fold=False) != 768  # the unfolded count misses the conv's length
    assert stats.macs(model) == 768
    assert [n.op_type for n in model.graph] == ["Max", "Reshape", "Conv"]  # counting left the model alone


def test_optimize_counts_input_and_output_alike():
    result = onnxshrink.optimize(_computed_reshape())
    assert result.before["macs"] == result.after["macs"] == 768


def test_symbolic_input_dims_are_not_unresolved():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    shapes = stats.inferred_shapes(model)
    assert not shapes.unresolved
    assert stats.macs(model) == 12 and stats.macs(model, {"N": 5}) == 60
