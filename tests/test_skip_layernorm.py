"""``avoid_skip_layernorm``: an Add that ONNX Runtime would fuse into SkipLayerNormalization becomes Sum."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import onnxshrink
from onnxshrink import model_io, pipeline
from tests.test_fusions import F16, F32, build, ops, run_pass

RNG = np.random.default_rng(3)
SHAPE = ["N", 4, 8]


def _block(dtype=F32, shape=SHAPE, residual_shape=None, extra_use=False, opset=17, add_output=False):
    """Post-LN residual: y = LayerNorm(r + (x @ W + b)) (a BERT layer's tail); with ``extra_use`` the sum
    is read once more (a pre-LN block's residual), with ``add_output`` it is a graph output too."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["mb"]),
             helper.make_node("Add", ["r", "mb"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "be"], ["y"], axis=-1, epsilon=1e-5)]
    outputs = [("y", dtype, shape)]
    if extra_use:
        nodes.append(helper.make_node("Add", ["y", "s"], ["z"]))
        outputs.append(("z", dtype, shape))
    if add_output:
        outputs.append(("s", dtype, shape))
    inits = {"W": RNG.standard_normal((8, 8)) * 0.3, "b": RNG.standard_normal(8), "g": RNG.uniform(0.5, 1.5, 8),
             "be": RNG.standard_normal(8)}
    return build(nodes, [("x", dtype, shape), ("r", dtype, residual_shape or shape)], outputs,
                 {k: v.astype(dtype) for k, v in inits.items()}, opset=opset)


def ort_fused_ops(model, tmp_path) -> collections.Counter:
    """Op counts of the graph ONNX Runtime runs (its default optimization level, CPU)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model_io.to_bytes(model)
    ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_residual_add_before_layernorm_becomes_sum_and_ort_no_longer_fuses_it(tmp_path):
    proto = _block()
    assert ort_fused_ops(proto, tmp_path)["SkipLayerNormalization"] == 1  # the premise: ORT fuses the original
    model, stats = run_pass(proto, "avoid_skip_layernorm")
    assert stats.counts["adds_as_sum"] == 1
    assert ops(model) == ["MatMul", "Add", "Sum", "LayerNormalization"]
    assert ort_fused_ops(model, tmp_path)["SkipLayerNormalization"] == 0
    feed = {"x": RNG.standard_normal((3, 4, 8)).astype(F32), "r": RNG.standard_normal((3, 4, 8)).astype(F32)}
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(model_io.to_bytes(model), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)  # fused vs not: the same up to rounding


def test_float16_block_rewritten():
    model, stats = run_pass(_block(F16), "avoid_skip_layernorm", F16)
    assert stats.counts["adds_as_sum"] == 1 and "Sum" in ops(model)


@pytest.mark.parametrize("case", ["second_reader", "graph_output", "broadcast", "rank4", "float64"])
def test_adds_onnx_runtime_would_not_fuse_are_left(case, tmp_path):
    kwargs = {
        "second_reader": {"extra_use": True},  # a pre-LN residual: ORT never fuses it either
        "graph_output": {"add_output": True},
        "broadcast": {"residual_shape": [1, 4, 8]},  # r broadcast over the batch
        "rank4": {"shape": ["N", 2, 4, 8]},
        "float64": {"dtype": np.float64},
    }[case]
    proto = _block(**kwargs)
    if case != "float64":  # float64 LayerNormalization: ORT's fusion refuses the type, as the pass does
        assert ort_fused_ops(proto, tmp_path)["SkipLayerNormalization"] == 0
    model, stats = run_pass(proto, "avoid_skip_layernorm", np.float64 if case == "float64" else F32)
    assert not stats.counts and "Sum" not in ops(model)


def test_unknown_shapes_do_not_stop_the_rewrite():
    """ONNX Runtime infers shapes after its own constant folding and may know what onnx's inference did
    not (PP-OCR rec's sequence length): an unknown shape is no reason to leave the Add."""
    proto = _block()
    del proto.graph.value_info[:]
    model = model_io.load(proto)
    for node in model.graph:
        for v in node.outputs:
            v.shape = None
    result = pipeline.make_pass("avoid_skip_layernorm", infer_shapes=False)(model)
    assert result.stats.counts["adds_as_sum"] == 1


def test_default_preset_keeps_transformer_out_of_skip_layernorm(tmp_path):
    """The zoo transformer's last residual Add feeds only the final LayerNormalization: ONNX Runtime fuses
    it once the default preset has folded the exported shape computations, unless it became Sum."""
    from models import zoo

    src = zoo.save("transformer", tmp_path)
    out = tmp_path / "out.onnx"
    result = onnxshrink.optimize(src, out)
    assert result.report.per_pass()["avoid_skip_layernorm"]["counts"]["adds_as_sum"] >= 1
    assert ort_fused_ops(model_io.load(out), tmp_path)["SkipLayerNormalization"] == 0
    without = onnxshrink.optimize(src, tmp_path / "without.onnx",
                                  passes=[n for n in _default_names() if n != "avoid_skip_layernorm"])
    assert ort_fused_ops(without.model, tmp_path)["SkipLayerNormalization"] >= 1  # what the pass prevents


def _default_names() -> list[str]:
    return [p.name for p in pipeline.default_steps()[0].passes]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantized_vit_keeps_its_float_residual_add_out_of_skip_layernorm(mode, tmp_path):
    """int8 leaves the trained ViT's last residual Add float (dynamic linear layers, or static QDQ with a
    float LayerNormalization after it): the build writes it as Sum, so ORT does not fuse it."""
    from models import digits

    result = onnxshrink.quantize(digits.trained_path("vit"), digits.feeds("vit", "calib", batch=32),
                                 tmp_path / "q.onnx", cache_dir=False, mode=mode, tune=False)
    assert result.report.per_pass()["avoid_skip_layernorm"]["counts"]["adds_as_sum"] == 1
    fused = ort_fused_ops(model_io.load(result.output), tmp_path)
    assert fused["SkipLayerNormalization"] == 0 and fused["Sum"] == 1


def test_pruned_vit_keeps_its_residual_add_out_of_skip_layernorm(tmp_path):
    from models import digits

    result = onnxshrink.prune(digits.trained_path("vit"), 0.3, tmp_path / "p.onnx")
    assert result.report.per_pass()["avoid_skip_layernorm"]["counts"]["adds_as_sum"] == 1
    fused = ort_fused_ops(model_io.load(result.output), tmp_path)
    assert fused["SkipLayerNormalization"] == 0 and fused["LayerNormalization"] == 5


def _written_out_block(extra_use=False, opset=14):
    """``r + x`` into a written-out layer norm (as exports below opset 17 write it), whose ReduceMean and
    Sub ONNX Runtime fuses into LayerNormalization and then, with the Add, into SkipLayerNormalization."""
    nodes = [helper.make_node("Add", ["r", "x"], ["s"]),
             helper.make_node("ReduceMean", ["s"], ["mean"], axes=[-1]), helper.make_node("Sub", ["s", "mean"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["d", "std"], ["n"]), helper.make_node("Mul", ["n", "g"], ["gn"]),
             helper.make_node("Add", ["gn", "be"], ["y"])]
    outputs = [("y", F32, SHAPE)]
    if extra_use:
        nodes.append(helper.make_node("Mul", ["s", "y"], ["z"]))
        outputs.append(("z", F32, SHAPE))
    inits = {"two": np.array(2.0, F32), "eps": np.array(1e-5, F32), "g": RNG.uniform(0.5, 1.5, 8).astype(F32),
             "be": RNG.standard_normal(8).astype(F32)}
    return build(nodes, [("x", F32, SHAPE), ("r", F32, SHAPE)], outputs, inits, opset=opset)


def test_add_into_written_out_layernorm_becomes_sum(tmp_path):
    proto = _written_out_block()
    assert ort_fused_ops(proto, tmp_path)["SkipLayerNormalization"] == 1  # ORT: LayerNormFusion, then Skip
    model, stats = run_pass(proto, "avoid_skip_layernorm")
    assert stats.counts["adds_as_sum"] == 1 and ops(model).count("Sum") == 1
    fused = ort_fused_ops(model, tmp_path)
    assert fused["SkipLayerNormalization"] == 0 and fused["LayerNormalization"] == 1  # ORT still fuses the LN


def test_add_into_written_out_layernorm_read_elsewhere_is_left(tmp_path):
    proto = _written_out_block(extra_use=True)
    assert ort_fused_ops(proto, tmp_path)["SkipLayerNormalization"] == 0
    model, stats = run_pass(proto, "avoid_skip_layernorm")
    assert not stats.counts and "Sum" not in ops(model)


def test_ppocr_rec_add_that_ort_fuses_after_its_own_layernorm_fusion_becomes_sum(tmp_path):
    """PP-OCR rec (opset 12) writes its layer norms out. Once cleaned, ORT fuses one of them with its
    residual Add: its own folding makes the sequence length static, which onnx's inference leaves symbolic."""
    from tests.conftest import fetch_or_skip

    src = fetch_or_skip("ppocr_rec")
    without = onnxshrink.optimize(src, passes=[n for n in _default_names() if n != "avoid_skip_layernorm"])
    assert ort_fused_ops(without.model, tmp_path)["SkipLayerNormalization"] == 1
    result = onnxshrink.optimize(src, tmp_path / "out.onnx")
    assert result.report.per_pass()["avoid_skip_layernorm"]["counts"]["adds_as_sum"] == 1
    assert ort_fused_ops(model_io.load(result.output), tmp_path)["SkipLayerNormalization"] == 0
