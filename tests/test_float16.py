"""Float16 models (as half-precision exporters and onnxconverter-common write them) through every mode:
pruning keeps float16 weights and never writes a model ONNX Runtime cannot load; ``upcast_float16``
computes in float32 behind the float16 interface; int8 quantization starts from that float32 copy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxshrink
from models import zoo
from onnxshrink import checks, model_io, pipeline, pruning
from onnxshrink.errors import CheckFailure
from onnxshrink.instruments import StructuralCheck
from onnxshrink.quantize import fusion_report


def _half(name: str, folder) -> str:
    path = folder / f"{name}16.onnx"
    onnx.save(zoo.to_float16(zoo.build(name)), path)
    return str(path)


def _float_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}


def _cosine_drift(a: dict, b: dict) -> float:
    worst = 0.0
    for k, v in a.items():
        x, y = v.astype(np.float64).ravel(), b[k].astype(np.float64).ravel()
        worst = max(worst, 1 - float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30)))
    return worst


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "mlp"])
def test_reconstruction_keeps_float16_weights(name, tmp_path, make_feeds, ort_run):
    """The least-squares refit used to write float32 weights into a float16 model: ONNX Runtime refused
    the result (Conv/MatMul/Gemm type parameter bound to two types), or, when a later cleanup reran the
    structural check, the check took the broken model for the input and skipped itself."""
    src = _half(name, tmp_path)
    feeds = make_feeds(src, batch=16, n=8)
    assert feeds[0][next(iter(feeds[0]))].dtype == np.float16
    plain = pruning.prune(src, 0.5, tmp_path / "plain.onnx", round_to=8)
    refit = pruning.prune(src, 0.5, tmp_path / "refit.onnx", round_to=8, calibration=feeds, reconstruct=True)
    assert refit.reconstruction["refit"], "nothing was refit"
    assert _float_types(refit.output) == {onnx.TensorProto.FLOAT16}
    onnx.checker.check_model(onnx.load(str(refit.output)), full_check=True)
    ref = [ort_run(src, f) for f in feeds]
    drift_plain = max(_cosine_drift(r, ort_run(plain.output, f)) for r, f in zip(ref, feeds))
    drift_refit = max(_cosine_drift(r, ort_run(refit.output, f)) for r, f in zip(ref, feeds))
    assert all(v.dtype == np.float16 for v in ort_run(refit.output, feeds[0]).values())
    assert drift_refit < drift_plain


def test_a_reconstruction_that_breaks_the_model_is_caught(tmp_path, monkeypatch, make_feeds):
    """Reconstruction is checked like a pass: one that leaves a weight of the wrong element type fails
    the run, naming it, and writes nothing."""
    from onnxshrink import reconstruct

    class Done:
        def to_dict(self):
            return {"refit": [], "bn": [], "skipped": [], "passes": 1}

    def breaking(original, pruned, kept, calibration, **kwargs):
        w = next(v for v in pruned.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT16)
        w.const_value = ir.tensor(w.const_value.numpy().astype(np.float32), name=w.name)
        w.dtype = ir.DataType.FLOAT
        return Done()

    monkeypatch.setattr(reconstruct, "reconstruct", breaking)
    src = _half("resnet", tmp_path)
    out = tmp_path / "out.onnx"
    with pytest.raises(CheckFailure, match="reconstruction left an invalid model"):
        pruning.prune(src, 0.5, out, round_to=8, calibration=make_feeds(src, batch=8, n=4), reconstruct=True)
    assert not out.exists()


def test_structural_check_judges_the_input_once(tmp_path):
    """One job runs several pipelines with the same check (prune: cleanup, pruning, cleanup); only the
    first one's start is the input. A broken model handed to a later start is not excused as 'the input'."""
    proto = zoo.to_float16(zoo.build("mlp"))
    check = StructuralCheck()
    check.begin(model_io.load(proto))
    w = proto.graph.initializer[0]
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w).astype(np.float32), w.name))
    broken = model_io.load(proto)
    assert not checks.check_structure(broken)
    check.begin(broken)
    assert check.run_checker and check.run_shapes and not check.input_problems


@pytest.mark.parametrize("name", ["resnet", "transformer", "lossless_patterns", "control_flow"])
def test_upcast_computes_in_float32_behind_a_float16_interface(name, tmp_path, make_feeds, ort_run):
    src = _half(name, tmp_path)
    model = model_io.load(src)
    result = pipeline.make_pass("upcast_float16")(model)
    assert result.modified
    graph = model.graph
    assert [v.dtype for v in graph.inputs] == [i.dtype for i in model_io.load(src).graph.inputs]
    assert {v.dtype for v in graph.outputs} == {ir.DataType.FLOAT16}
    inner = [v for node in graph for v in node.outputs if not v.is_graph_output()]
    assert not [v.name for v in [*inner, *graph.initializers.values()] if v.dtype == ir.DataType.FLOAT16]
    assert checks.check_structure(model), checks.check_structure(model).problems
    for feed in make_feeds(src, batch=2, n=2):
        ref, got = ort_run(src, feed), ort_run(model, feed)
        for k, r in ref.items():
            assert got[k].dtype == r.dtype == np.float16
            np.testing.assert_allclose(got[k].astype(np.float32), r.astype(np.float32), rtol=2e-2, atol=2e-2)


def test_upcast_does_not_fire_on_float32_and_handles_odd_outputs(tmp_path, ort_run):
    """A float32 model is left alone; an output listed twice gets one Cast, an initializer output keeps
    its name, an input that is also an output stays as it is."""
    assert not pipeline.make_pass("upcast_float16")(model_io.load(zoo.build("mlp"))).modified
    h, f16 = onnx.helper, onnx.TensorProto.FLOAT16
    proto = h.make_model(h.make_graph(
        [h.make_node("Add", ["x", "w"], ["y"])], "g",
        [h.make_tensor_value_info(n, f16, [2]) for n in ("x", "keep")],
        [h.make_tensor_value_info(n, f16, [2]) for n in ("y", "y", "w", "keep")],
        [onnx.numpy_helper.from_array(np.array([1.5, -2.0], np.float16), "w")]),
        opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    model = model_io.load(proto)
    pipeline.make_pass("upcast_float16")(model)
    assert [v.name for v in model.graph.outputs] == ["y", "y", "w", "keep"]
    assert sum(n.op_type == "Cast" for n in model.graph) == 3  # x in; y and w out
    x = np.array([1.0, 2.0], np.float16)
    got = ort_run(model, {"x": x, "keep": x})
    np.testing.assert_array_equal(got["y"], np.array([2.5, 0.0], np.float16))
    np.testing.assert_array_equal(got["w"], np.array([1.5, -2.0], np.float16))


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_float16_models_are_quantized_to_int8(name, tmp_path, make_feeds, ort_run):
    """ONNX Runtime's quantizer does not quantize float16 models; onnxshrink quantizes a float32 copy and
    keeps the float16 interface: every Conv/Gemm fused to an integer kernel, outputs close."""
    src = _half(name, tmp_path)
    feeds = make_feeds(src, batch=2, n=4)
    result = onnxshrink.quantize(src, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False)
    assert result.upcast_float16 > 0
    report = fusion_report(result.output)
    assert report and not any(op in report.ops for op in ("Conv", "Gemm", "MatMul")), report.ops
    ref, got = ort_run(src, feeds[0]), ort_run(result.output, feeds[0])
    for k, r in ref.items():
        assert got[k].dtype == np.float16
        a, b = r.astype(np.float64).ravel(), got[k].astype(np.float64).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
