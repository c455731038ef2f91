"""Float16 models (as half-precision exporters and onnxconverter-common write them) through every mode:
the rewrites keep float16 weights, never write a model ONNX Runtime cannot load, and a model with nothing
to quantize finishes with a warning instead of a crash."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import zoo
from onnxshrink import model_io, pruning
from onnxshrink.errors import CheckFailure
from onnxshrink.instruments import StructuralCheck


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
    assert not checks_pass(broken)
    check.begin(broken)
    assert check.run_checker and check.run_shapes and not check.input_problems


def checks_pass(model) -> bool:
    from onnxshrink import checks

    return bool(checks.check_structure(model))
