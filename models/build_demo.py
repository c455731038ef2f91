"""Build the demo model bundled in the package (onnxshrink/bundled/demo.onnx).

A small CNN classifier written the way exporters often write them: Conv followed by BatchNormalization,
Identity and Dropout nodes, a Shape/Gather/Concat chain computing the flatten shape, MatMul + Add
instead of Gemm, a Mul by one. The lossless preset should remove most of that.

Run: python models/build_demo.py  (writes onnxshrink/bundled/demo.onnx)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    def bn(prefix, c):
        return [
            numpy_helper.from_array((1 + 0.1 * rng.standard_normal(c)).astype(np.float32), f"{prefix}_g"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"{prefix}_b"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"{prefix}_m"),
            numpy_helper.from_array((1 + 0.1 * rng.random(c)).astype(np.float32), f"{prefix}_v"),
        ]

    inits = [
        init("w1", 16, 3, 3, 3), init("w2", 32, 16, 3, 3), init("fc_w", 32, 10),
        init("fc_b", 10), *bn("bn1", 16), *bn("bn2", 32),
        numpy_helper.from_array(np.array([0], np.int64), "zero_idx"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Identity", ["input"], ["x0"], name="input_identity"),
        helper.make_node("Conv", ["x0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["b1"], name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["b2"], name="bn2"),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("Dropout", ["r2"], ["d2"], name="dropout"),
        helper.make_node("GlobalAveragePool", ["d2"], ["g"], name="gap"),
        helper.make_node("Shape", ["g"], ["g_shape"], name="shape"),
        helper.make_node("Gather", ["g_shape", "zero_idx"], ["batch"], name="gather_batch", axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], name="concat_shape", axis=0),
        helper.make_node("Reshape", ["g", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Mul", ["flat", "one"], ["flat1"], name="mul_one"),
        helper.make_node("MatMul", ["flat1", "fc_w"], ["mm"], name="fc_matmul"),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc_add"),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_cnn",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxshrink-demo")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "onnxshrink" / "bundled" / "demo.onnx"
    onnx.save(build(), out)
    print(f"wrote {out}")
