"""``graph_utils.add_initializer``: the tensors it registers serialize as ``ir.tensor``'s would."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from onnxshrink.graph_utils import add_initializer


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int32, np.int64,
                                   np.bool_, ml_dtypes.bfloat16])
def test_add_initializer_serializes_as_ir_tensor(dtype):
    array = np.arange(6).reshape(2, 3).astype(dtype)
    graph = ir.Graph([], [], nodes=[])
    value = add_initializer(graph, array[:, ::-1], "w")  # not contiguous: made so
    expected = ir.tensor(np.ascontiguousarray(array[:, ::-1]), name="w")
    assert graph.initializers["w"] is value and value.const_value.dtype == expected.dtype
    assert value.shape == ir.Shape([2, 3])
    got = ir.serde.serialize_tensor(value.const_value).SerializeToString()
    assert got == ir.serde.serialize_tensor(expected).SerializeToString()
