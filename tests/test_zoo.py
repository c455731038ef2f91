"""The test model zoo: every model is valid, deterministic, small and runs on ONNX Runtime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models import zoo

REQUIRED = {
    "plain_cnn", "resnet", "mobilenetv2", "inception", "densenet", "grouped_conv", "split_branches",
    "mlp", "transformer", "dynamic_batch", "control_flow", "lossless_patterns",
}


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _out_shape(vi: onnx.ValueInfoProto, batch: int) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim)


def test_zoo_has_the_promised_models():
    assert REQUIRED <= set(zoo.ZOO)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_is_valid_and_runs(name, ort_run, make_feeds, tmp_path):
    model = zoo.build(name)
    assert model.opset_import[0].version == 17
    assert model.ByteSize() < 2_000_000
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    for vi in model.graph.input:
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert vi.type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 3):
        for feed in make_feeds(model, batch=batch, n=1, seed=batch):
            outs = ort_run(path, feed)
            for vi in model.graph.output:
                got = outs[vi.name]
                assert got.shape == _out_shape(vi, batch)
                assert got.dtype == np.float32
                assert np.isfinite(got).all()


@pytest.mark.parametrize("name", ["resnet", "transformer", "control_flow"])
def test_zoo_is_deterministic(name):
    assert zoo.build(name).SerializeToString() == zoo.build(name).SerializeToString()


def test_transformer_is_exporter_style():
    model = zoo.build("transformer")
    ops = _ops(model)
    for op in ("Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Transpose", "MatMul", "Div",
               "Softmax", "LayerNormalization", "Erf"):
        assert ops[op] > 0, op
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    concat_consts = [
        inits[i].tolist() for n in model.graph.node if n.op_type == "Concat" for i in n.input if i in inits
    ]
    assert [4, 16] in concat_consts  # head count and head size inside the Reshape shape


def test_lossless_patterns_holds_its_patterns():
    ops = _ops(zoo.build("lossless_patterns"))
    for op in ("Identity", "BatchNormalization", "Dropout", "Cast", "ReduceProd", "Shape", "MatMul"):
        assert ops[op] > 0, op
    assert ops["Reshape"] >= 3 and ops["Transpose"] == 2


def test_control_flow_takes_both_branches(ort_run):
    """The If condition depends on the data: random feeds reach both branches (outputs then differ
    from a model whose If is forced to one branch)."""
    model = zoo.build("control_flow")
    cond_name = next(n.input[0] for n in model.graph.node if n.op_type == "If")
    model.graph.output.append(onnx.helper.make_tensor_value_info(cond_name, onnx.TensorProto.BOOL, []))
    seen = set()
    for seed in range(8):
        x = np.random.default_rng(seed).standard_normal((1, 8)).astype(np.float32)
        seen.add(bool(ort_run(model, {"input": x})[cond_name]))
    assert seen == {True, False}
