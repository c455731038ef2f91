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


def _run_time_shapes() -> ir.Model:
    """x [N,8,L] -> Reshape to [Floor(L), 8] (read with Shape, through a float Floor) -> MatMul with
    w [4,8]: 4 * 8 * L MACs at batch 1."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, "L"])
    w = numpy_helper.from_array(np.ones((4, 8), np.float32), "w")
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=2),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("Floor", ["sf"], ["lf"]),
             helper.make_node("Cast", ["lf"], ["l"], to=TensorProto.INT64),
             helper.make_node("Concat", ["l", "eight"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["r"]),  # [L, 8] (batch 1)
             helper.make_node("Transpose", ["r"], ["r_t"]),
             helper.make_node("MatMul", ["w", "r_t"], ["y"])]
    inits = [w, numpy_helper.from_array(np.array([8], np.int64), "eight")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_shapes_read_at_run_time_are_counted_at_the_given_size():
    """A reshape target read from ``Shape`` through arithmetic onnx's data propagation does not follow
    (here a float Floor; PP-OCR rec's head has such a chain): inference leaves the MatMul's length
    unknown whatever the input size; pinned to the counted size and folded, the copy resolves it."""
    model = _run_time_shapes()
    assert stats.macs(model, {"x:2": 10}, fold=False) != 4 * 8 * 10  # inference alone misses it
    assert stats.macs(model, {"x:2": 10}) == 4 * 8 * 10
    assert stats.macs(model, {"L": 7}) == 4 * 8 * 7


def test_stale_symbolic_shapes_do_not_shrink_the_count():
    """A model that went through an earlier inference on symbolic inputs carries shapes like
    ``[-1, 8, unk__0, unk__1]`` on its values (a Paddle export's -1 batch, then symbols onnx made up;
    every model onnxshrink wrote does). The folded copy is pinned to the counted size; kept, those stale
    dims counted as 1 (a pruned PP-OCR cls: 16.3M MACs -> 0.12M)."""
    model = _run_time_shapes()
    for i, node in enumerate(model.graph):
        for v in node.outputs:
            if node.op_type in ("Reshape", "Transpose", "MatMul"):
                v.type = ir.TensorType(ir.DataType.FLOAT)
                v.shape = ir.Shape([-1, f"unk__{i}"])
    assert stats.macs(model, {"x:2": 10}) == 4 * 8 * 10
    assert model.graph.node(5).outputs[0].shape is not None  # counting left the model's shapes alone


def test_counting_on_a_copy_leaves_the_model_alone():
    """onnx_ir's clone shares type objects and ``value.dtype = x`` changes them in place: a pass on a
    plain clone retyped the original (PP-OCR rec's Slice output went int32 -> int64 while counting MACs,
    and the default preset stopped being idempotent on it)."""
    from onnxshrink.graph_utils import clone_model

    model = _computed_reshape()
    clone_model(model).graph.inputs[0].dtype = ir.DataType.DOUBLE
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT
    model.clone().graph.inputs[0].dtype = ir.DataType.DOUBLE
    assert model.graph.inputs[0].dtype == ir.DataType.DOUBLE  # what a plain clone does, clone_model avoids


def test_a_stale_paddle_batch_does_not_hide_the_pinned_one():
    """Paddle's -1 for a dynamic batch, left on a value by an earlier inference, contradicts a pinned
    batch; onnx then kept the stale dims and the count fell to 1x1 (without folding too)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    w = numpy_helper.from_array(np.ones((8, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])], "g", [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 8, "unk__2", "unk__3"])], [w],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [-1, 8, "unk__0", "unk__1"])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    dims = {"x:0": 2, "x:2": 4, "x:3": 5}
    assert stats.macs(model, dims, fold=False) == stats.macs(model, dims) == 2 * 8 * 4 * 5 * 3


def test_shapes_only_the_model_knows_survive_the_folded_copy():
    """An op onnx cannot infer (a contrib op: ddddocr's DynamicQuantizeLSTM) keeps the shape written on
    its output; the folded copy must not drop it, or the reshape read from it cannot fold and the
    MatMul after it goes uncounted (ddddocr's recognizer: 9.9M MACs before cleanup, 18.3M after)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, "W"])
    u = helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, "W", 8])
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("Opaque", ["x"], ["u"], domain="com.example"),
             helper.make_node("Shape", ["u"], ["s"]),
             helper.make_node("Gather", ["s", "two"], ["c"], axis=0),
             helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
             helper.make_node("Floor", ["cf"], ["cff"]),
             helper.make_node("Cast", ["cff"], ["ci"], to=TensorProto.INT64),
             helper.make_node("Concat", ["minus_one", "ci"], ["shape"], axis=0),
             helper.make_node("Reshape", ["u", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    inits = [w, numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits, value_info=[u])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model = ir.serde.deserialize_model(proto)
    assert stats.macs(model, fold=False) != 8 * 4  # inference alone does not reach the MatMul's length
    assert stats.macs(model) == 8 * 4  # one row (the width counts as 1), 8 inputs, 4 outputs


def test_a_weight_op_fed_through_a_value_folding_removes_is_counted():
    """The bundled demo's head: Reshape(g, [Shape(g)[0], -1]) -> Mul by 1 -> MatMul 32 -> 10. Inference
    leaves the MatMul's input [batch, unk]; the folded copy resolves it but drops the Mul's output, so the
    count goes through the MatMul of the same name: 320 MACs at batch 1 (it counted 10)."""
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    w = numpy_helper.from_array(np.ones((32, 10), np.float32), "w")
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    minus = numpy_helper.from_array(np.array([-1], np.int64), "minus")
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "minus"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("Mul", ["flat", "one"], ["f1"]),
             helper.make_node("MatMul", ["f1", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [one, w, zero, minus])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert stats.macs(model) == 320 and stats.macs(model, {"N": 4}) == 1280
    result = onnxshrink.optimize(model)
    assert result.before["macs"] == result.after["macs"] == 320
