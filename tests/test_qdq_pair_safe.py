"""Pair-safe int8 weights (``_qdq_math.kernel_rows``, ``pair_safe_scale``): ONNX Runtime's x86 int8 GEMM
adds neighbouring u8 x s8 products into an int16 where the probe says it saturates. These tests ask it
which neighbours it pairs: weights whose neighbours in ``kernel_rows``' K order sum to 128 compute exactly
at the largest input (255); weights that are safe in another order but not in that one clip."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxshrink.passes._qdq_math import PAIR_LIMIT, kernel_rows, neighbour_sums

from onnxshrink import ort_int8
from tests.conftest import run_ort

SATURATES = ort_int8.saturating_ops("uint8")


def _qdq(op: str, wq: np.ndarray, x_shape, axis: int, **attrs):
    """x (uint8 codes, scale 1) -> op with int8 weight ``wq`` (scale 1) -> uint8 output (scale 40000)."""
    o = wq.shape[axis]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s1"), numpy_helper.from_array(np.array(0, np.uint8), "zx"),
             numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.ones(o, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(o, np.int8), "wz"),
             numpy_helper.from_array(np.array(40000.0, np.float32), "so"), numpy_helper.from_array(np.array(0, np.uint8), "zo")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s1", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis),
             helper.make_node(op, ["xd", "wd"], ["y"], **attrs),
             helper.make_node("QuantizeLinear", ["y", "so", "zo"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "so", "zo"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _ratio(op, wq, x_shape, axis, first_row, **attrs) -> float:
    """ONNX Runtime's first output over the exact sum of the first output channel at input 255."""
    got = run_ort(_qdq(op, wq, x_shape, axis, **attrs), {"x": np.full(x_shape, 255, np.float32)})["out"]
    return float(got.ravel()[0] / (255.0 * first_row.astype(np.int64).sum()))


def _alternating(k_order: np.ndarray) -> np.ndarray:
    return np.where(k_order % 2 == 0, 127, 1).astype(np.int8)  # neighbours in that order sum to 128


CASES = {  # name: (op, weight shape, input shape, channel axis, attrs, index along the kernel's K order)
    "conv3x3_c16": ("Conv", (4, 16, 3, 3), [1, 16, 6, 6], 0, {}, lambda i: (i[2] * 3 + i[3]) * 16 + i[1]),
    "conv3x3_c3": ("Conv", (4, 3, 3, 3), [1, 3, 6, 6], 0, {}, lambda i: (i[2] * 3 + i[3]) * 3 + i[1]),
    "conv1x1": ("Conv", (4, 16, 1, 1), [1, 16, 6, 6], 0, {}, lambda i: i[1]),
    "matmul": ("MatMul", (16, 4), [1, 16], 1, {}, lambda i: i[0]),
    "gemm_transb": ("Gemm", (4, 16), [1, 16], 0, {"transB": 1}, lambda i: i[1]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_rows_name_the_pairs_onnxruntime_adds(name):
    op, shape, x_shape, axis, attrs, k_index = CASES[name]
    safe = _alternating(k_index(np.indices(shape)))
    rows = kernel_rows(safe.astype(np.float32), op, axis, attrs.get("transB", 0) == 1)
    assert neighbour_sums(rows, 1).max() <= PAIR_LIMIT
    assert _ratio(op, safe, x_shape, axis, rows[0], **attrs) == pytest.approx(1.0, abs=0.12)
    # the same codes shifted by one along K: neighbours now pair 127 with 127
    unsafe = _alternating(k_index(np.indices(shape)) // 2)
    rows_u = kernel_rows(unsafe.astype(np.float32), op, axis, attrs.get("transB", 0) == 1)
    clipped = _ratio(op, unsafe, x_shape, axis, rows_u[0], **attrs) < 0.8
    assert clipped == (op in SATURATES), (name, sorted(SATURATES))


@pytest.mark.parametrize("shape,k_axis,reduce_axes", [
    ((37, 53), 1, 1), ((37, 53), 0, 0), ((37, 53), 1, (0, 1)), ((37, 53), 0, (0, 1)),
    ((1, 9), 1, 1), ((9, 1), 1, 1), ((9, 1), 0, 0)])
def test_pair_safe_scales_read_in_blocks_are_the_whole_arrays(monkeypatch, shape, k_axis, reduce_axes):
    """``pair_safe_scale`` reads a 2-D weight in blocks of slices: the same scales, to the bit, as the
    whole-array formula, whatever the block size (one slice to all of them), on transposed views too."""
    from onnxshrink.passes import _qdq_math

    rng = np.random.default_rng(0)
    for w in (rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape[::-1]).astype(np.float32).T):
        top = np.abs(w.astype(np.float64)).max(axis=reduce_axes)
        if w.shape[k_axis] > 1:
            top = np.maximum(top, neighbour_sums(w, k_axis).max(axis=reduce_axes))
        want = _qdq_math._scale(top, 127)
        for block in (8, 64, 1 << 20):
            monkeypatch.setattr(_qdq_math, "BLOCK_BYTES", block)
            got = _qdq_math.pair_safe_scale(w, k_axis, reduce_axes)
            assert got.shape == want.shape and np.array_equal(got, want), block
