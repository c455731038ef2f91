"""Model I/O: sources, round trips, external data, atomic writes and every kind of bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from onnxshrink import model_io
from onnxshrink.errors import ModelLoadError, OutputError, UnsupportedModelError


def _model(opset: int = 17, ir_version: int = 8, weight_elems: int = 64) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(weight_elems, dtype=np.float32).reshape(-1, 8) / 10, "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", w.dims[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])],
        [w],
        doc_string="graph doc",
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="t")
    m.ir_version = ir_version
    helper.set_model_props(m, {"author": "tests"})
    return m


def test_load_from_path_bytes_proto_and_ir(tmp_path):
    proto = _model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    for src in (path, str(path), proto.SerializeToString(), proto):
        m = model_io.load(src)
        assert isinstance(m, ir.Model)
        assert [n.op_type for n in m.graph] == ["MatMul"]
    m = model_io.load(path)
    assert model_io.load(m) is m


def test_round_trip_keeps_metadata_names_and_opsets(tmp_path):
    proto = _model()
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    out = model_io.save(model_io.load(src), tmp_path / "o.onnx")
    back = onnx.load(out)
    assert back.ir_version == proto.ir_version
    assert {o.domain: o.version for o in back.opset_import} == {"": 17}
    assert {p.key: p.value for p in back.metadata_props} == {"author": "tests"}
    assert back.graph.doc_string == "graph doc"
    assert back.graph.node[0].name == "mm"
    assert [i.name for i in back.graph.initializer] == ["w"]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"this is certainly not a protobuf model \x00\xff\xfe", "not an ONNX model"),
        (b"\n\x05hello", "not an ONNX model"),
    ],
)
def test_not_onnx(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match):
        model_io.load(p)


def test_truncated_file(tmp_path):
    data = _model(weight_elems=4096).SerializeToString()
    p = tmp_path / "trunc.onnx"
    for cut in (len(data) // 2, len(data) - 3, 20):
        p.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            model_io.load(p)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        model_io.load(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="directory"):
        model_io.load(tmp_path)


def _save_external(tmp_path) -> Path:
    p = tmp_path / "ext.onnx"
    onnx.save(_model(weight_elems=4096), p, save_as_external_data=True, location="ext.data",
              size_threshold=0)
    return p


def test_external_data_loads_lazily_and_saves_external(tmp_path):
    p = _save_external(tmp_path)
    m = model_io.load(p)
    tensor = m.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = model_io.save(m, out_dir / "o.onnx")
    assert (out_dir / "o.onnx.data").exists()  # kept external, next to the output
    back = model_io.load(out)
    np.testing.assert_array_equal(back.graph.initializers["w"].const_value.numpy(), tensor.numpy())


def test_missing_and_truncated_external_data(tmp_path):
    p = _save_external(tmp_path)
    data = tmp_path / "ext.data"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        model_io.load(p)
    data.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        model_io.load(p)


def test_large_model_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = model_io.save(model_io.load(_model(weight_elems=4096)), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size == 4096 * 4
    assert model_io.file_size(out) > 4096 * 4


@pytest.mark.parametrize("opset, ir_version, match", [(5, 8, "opset 5"), (17, 99, "IR version 99")])
def test_unsupported_versions(opset, ir_version, match):
    with pytest.raises(UnsupportedModelError, match=match):
        model_io.load(_model(opset=opset, ir_version=ir_version))


def test_never_overwrites_input_unless_asked(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_model(), p)
    before = p.read_bytes()
    m = model_io.load(p)
    with pytest.raises(OutputError, match="input model"):
        model_io.save(m, p, protected=(p,))
    assert p.read_bytes() == before
    model_io.save(m, p, protected=(p,), overwrite_input=True)
    assert model_io.load(p).graph.node(0).op_type == "MatMul"


def test_never_overwrites_the_inputs_external_data(tmp_path):
    """Output 'weights.onnx' writes 'weights.onnx.data': when that is the input's data file, the input
    used to keep loading but compute with the output's weights (exit 0). Naming the data file itself is
    refused too; replacing the input as asked still works."""
    p = tmp_path / "model.onnx"
    onnx.save(_model(), p, save_as_external_data=True, location="weights.onnx.data", size_threshold=0)
    data = tmp_path / "weights.onnx.data"
    before = data.read_bytes()
    m = model_io.load(p)
    for out in ("weights.onnx", "weights.onnx.data"):
        with pytest.raises(OutputError, match="external-data file of the input"):
            model_io.check_output(tmp_path / out, protected=(p,))
        with pytest.raises(OutputError, match="external-data file of the input"):
            model_io.save(m, tmp_path / out, protected=(p,), external_data=True)
    assert data.read_bytes() == before
    model_io.save(m, tmp_path / "other.onnx", protected=(p,), external_data=True)
    model_io.save(model_io.load(p), p, protected=(p,), overwrite_input=True)
    assert model_io.load(p).graph.node(0).op_type == "MatMul"


def test_unwritable_output(tmp_path):
    m = model_io.load(_model())
    with pytest.raises(OutputError, match="does not exist"):
        model_io.save(m, tmp_path / "missing_dir" / "o.onnx")
    with pytest.raises(OutputError):
        model_io.save(m, Path("/proc/onnxshrink-test.onnx"))  # unwritable even for root
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("permissions are not enforced for this user (root)")
        with pytest.raises(OutputError, match="not writable"):
            model_io.save(m, ro / "o.onnx")
    finally:
        os.chmod(ro, 0o700)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old contents")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(model_io.ir, "save", boom)
    with pytest.raises(OutputError, match="disk full"):
        model_io.save(model_io.load(_model()), out)
    assert out.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["o.onnx"]  # no temp files left behind


def test_small_external_tensors_pass_the_structural_check(tmp_path):
    """Small initializers stored as external data used to reach onnx's checker as references to a file
    it could not find (no model path): every such model 'already failed a check', so the pipeline
    skipped its structural checks."""
    import onnxshrink
    from onnxshrink import checks

    p = tmp_path / "small.onnx"
    onnx.save(_model(weight_elems=16), p, save_as_external_data=True, location="small.data", size_threshold=0)
    m = model_io.load(p)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in m.graph.initializers.values())
    assert checks.check_structure(m), checks.check_structure(m).problems
    assert onnxshrink.optimize(p).input_problems == []


@pytest.mark.parametrize("job", ["optimize", "prune", "quantize"])
def test_an_unwritable_output_is_refused_before_any_work(job, tmp_path):
    """``-o`` into a missing folder used to fail at the very end, after calibration or reconstruction;
    now before the model is even read (here it does not exist, and the output error comes first)."""
    import onnxshrink

    out = tmp_path / "missing" / "o.onnx"
    run = {"optimize": lambda: onnxshrink.optimize(tmp_path / "nope.onnx", out),
           "prune": lambda: onnxshrink.prune(tmp_path / "nope.onnx", 0.3, out),
           "quantize": lambda: onnxshrink.quantize(tmp_path / "nope.onnx", None, out, mode="dynamic")}[job]
    with pytest.raises(OutputError, match="does not exist"):
        run()


def test_quantize_and_prune_a_model_with_external_data(tmp_path, monkeypatch):
    """Sessions of in-memory models were made from bytes in some places (the calibration method's
    selection, the placement tuner): a model reading external data failed there, its relative paths
    resolved against the working directory. The working directory here is another folder. The outputs
    keep external data: they were written as one protobuf once pruning or quantizing had replaced every
    external tensor, which holds two more copies of the weights in memory while saving."""
    import onnxshrink
    from models import digits
    from onnxshrink import runtime

    src = tmp_path / "src"
    src.mkdir()
    onnx.save(onnx.load(str(digits.trained_path("cnn"))), src / "cnn.onnx", save_as_external_data=True,
              location="cnn.data", size_threshold=0)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    calib = digits.feeds("cnn", "calib", batch=64, limit=128)
    x, y = digits.model_input("cnn", "test")
    q = onnxshrink.quantize(src / "cnn.onnx", calib, tmp_path / "q.onnx", cache_dir=False, tune_runs=3)
    p = onnxshrink.prune(src / "cnn.onnx", 0.3, tmp_path / "p.onnx", criterion="reconstruction",
                         calibration=calib, reconstruct=True)
    for out in (q.output, p.output):
        assert digits.accuracy(runtime.make_session(out, threads=1).run(None, {"input": x})[0], y) > 0.95
        # the input's format is kept, though pruning and quantizing replaced every external tensor
        assert out.with_name(out.name + ".data").is_file()
        assert model_io.uses_external_data(model_io.load(out))


def test_sparse_initializers_are_stored_dense(tmp_path, caplog):
    """The IR drops sparse initializers: a model was written without its weight (ONNX Runtime refused
    it, exit 0) or the cleanup crashed. They are now loaded as dense initializers, with a warning."""
    import onnxruntime as ort

    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    w[w < 0.5] = 0
    flat = np.flatnonzero(w).astype(np.int64)
    coords = np.stack(np.unravel_index(flat, w.shape), axis=1).astype(np.int64)
    for indices in (flat, coords):  # linear and [NNZ, rank] coordinate indices
        sp = helper.make_sparse_tensor(numpy_helper.from_array(w.ravel()[flat], "w"),
                                       numpy_helper.from_array(indices, "w_idx"), list(w.shape))
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], sparse_initializer=[sp])
        p = tmp_path / "sparse.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), p)
        with caplog.at_level("WARNING", logger="onnxshrink.model_io"):
            m = model_io.load(p)
        assert "1 sparse initializers stored dense" in caplog.text
        np.testing.assert_array_equal(m.graph.initializers["w"].const_value.numpy(), w)
        out = model_io.save(m, tmp_path / "dense.onnx")
        x = np.ones((2, 8), np.float32)
        got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, x @ w, rtol=1e-6)


def test_a_large_in_memory_model_reaches_onnxruntime_through_external_data(monkeypatch):
    """Over ``INLINE_SESSION_BYTES`` an in-memory model is written to a temporary file with external
    data for ONNX Runtime instead of serialized to bytes (which holds two more copies of its tensors);
    the session computes the same."""
    from models import digits
    from onnxshrink import runtime

    path = digits.trained_path("cnn")
    x, _ = digits.model_input("cnn", "test")
    want = runtime.make_session(path, threads=1).run(None, {"input": x[:8]})[0]
    monkeypatch.setattr(runtime, "INLINE_SESSION_BYTES", 0)
    written = []
    save = model_io.save
    monkeypatch.setattr(model_io, "save", lambda *a, **k: written.append(k.get("external_data")) or save(*a, **k))
    got = runtime.make_session(model_io.load(path), threads=1).run(None, {"input": x[:8]})[0]
    assert written == [True]
    np.testing.assert_array_equal(got, want)
