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


# ---------------------------------------------------------------- trained digits classifiers

MIN_ACCURACY = {"cnn": 0.97, "resnet": 0.97, "mobilenet": 0.97, "inception": 0.97, "mlp": 0.97, "vit": 0.93}


def test_digits_splits_are_disjoint_and_sized():
    from models import digits

    raw = np.load(digits.DATA)
    train, calib, test = (set(raw[f"{s}_idx"].tolist()) for s in ("train", "calib", "test"))
    assert len(test) == 360 and len(calib) == 512 and len(train) + len(test) == 1797
    assert not train & test and calib <= train
    x, y = digits.load_split("test")
    assert x.shape == (360, 1, 16, 16) and x.dtype == np.float32 and y.dtype == np.int64
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert digits.load_split("calib", flat=True)[0].shape == (512, 64)


def test_digits_upsample_is_bilinear_half_pixel():
    from models import digits

    img = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    up = digits.upsample(img, 4)
    assert up.shape == (1, 4, 4)
    np.testing.assert_allclose(up[0, 0], [0, 0.25, 0.75, 1])  # torch align_corners=False values
    np.testing.assert_allclose(up[0, :, 0], [0, 0.5, 1.5, 2])


@pytest.mark.parametrize("name", sorted(MIN_ACCURACY))
def test_digits_model_is_accurate(name, ort_run):
    from models import digits

    path = digits.trained_path(name)
    assert path.stat().st_size < 1_000_000
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x, y = digits.model_input(name, "test")
    logits = ort_run(path, {"input": x})["logits"]
    assert logits.shape == (360, 10)
    assert digits.accuracy(logits, y) >= MIN_ACCURACY[name]


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_digits_torch_weights_match_onnx(name, ort_run):
    torch = pytest.importorskip("torch")
    from models import digits, digits_torch

    module = digits_torch.load_torch(name)
    x, _ = digits.model_input(name, "calib")
    with torch.no_grad():
        ref = module(torch.from_numpy(x[:64])).numpy()
    np.testing.assert_allclose(ort_run(digits.trained_path(name), {"input": x[:64]})["logits"], ref,
                               rtol=1e-3, atol=1e-4)
