"""``fuse_layernorm``: written-out layer normalization -> LayerNormalization (opset >= 17)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxshrink
from onnxshrink import model_io, pipeline
from tests.qdq_helpers import cosine, feeds_for, ort_run
from tests.test_fusions import F16, F32, build, ops, run_pass

RNG = np.random.default_rng(7)
SHAPE = [2, 5, 6]


def _reduce(x: str, out: str, axes: list[int], opset: int, keepdims: int = 1) -> list:
    """ReduceMean over ``axes``: an attribute below opset 18, a constant input from 18."""
    if opset >= 18:
        name = f"{out}_axes"
        return [helper.make_node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64,
                                                                               [len(axes)], axes)),
                helper.make_node("ReduceMean", [x, name], [out], keepdims=keepdims)]
    return [helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=keepdims)]


def _layernorm(opset: int, square: str = "pow", affine: str = "both", axes=(-1,), var_axes=None,
               keepdims: int = 1) -> list:
    """x -> h: (x - mean) / sqrt(var + eps) [* gamma] [+ beta], as Paddle and PyTorch exports write it."""
    nodes = [*_reduce("x", "mean", list(axes), opset, keepdims), helper.make_node("Sub", ["x", "mean"], ["d"])]
    nodes.append(helper.make_node("Pow", ["d", "two"], ["sq"]) if square == "pow"
                 else helper.make_node("Mul", ["d", "d"], ["sq"]))
    nodes += _reduce("sq", "var", list(var_axes or axes), opset, keepdims)
    nodes += [helper.make_node("Add", ["eps", "var"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
              helper.make_node("Div", ["d", "std"], ["n" if affine != "none" else "h"])]
    if affine in ("both", "gamma"):
        nodes.append(helper.make_node("Mul", ["gamma", "n"], ["g" if affine == "both" else "h"]))
    if affine == "both":
        nodes.append(helper.make_node("Add", ["g", "beta"], ["h"]))
    return nodes


def _model(nodes, opset, dtype=F32, gamma_shape=(6,), outputs=None, shape=SHAPE):
    consts = {"two": np.array(2.0), "eps": np.array(1e-5), "gamma": RNG.uniform(0.5, 1.5, gamma_shape),
              "beta": RNG.standard_normal(gamma_shape)}
    consts = {k: v.astype(dtype) for k, v in consts.items()}
    return build([helper.make_node("Neg", ["in"], ["x"]), *nodes, helper.make_node("Neg", ["h"], ["y"])],
                 [("in", dtype, shape)], outputs or [("y", dtype, shape)], consts, opset=opset)


def _ln(model):
    return next(n for n in model.graph if n.op_type == "LayerNormalization")


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("affine", ["both", "gamma", "none"])
def test_layernorm_forms_fused(opset, square, affine):
    model, stats = run_pass(_model(_layernorm(opset, square, affine), opset), "fuse_layernorm")
    assert stats.counts["layernorm_fused"] == 1 and ops(model) == ["Neg", "LayerNormalization", "Neg"]
    ln = _ln(model)
    assert ln.attributes.get_int("axis") == 2 and np.isclose(ln.attributes.get_float("epsilon"), 1e-5)
    assert len(ln.inputs) == (3 if affine == "both" else 2)


def test_two_trailing_axes_and_broadcast_gamma():
    """Normalized over the last two axes; a [1, 6] gamma becomes a [5, 6] scale."""
    model, stats = run_pass(_model(_layernorm(17, axes=(1, 2)), 17, gamma_shape=(1, 6)), "fuse_layernorm")
    assert stats.counts["layernorm_fused"] == 1
    ln = _ln(model)
    assert ln.attributes.get_int("axis") == 1 and ln.inputs[1].const_value.numpy().shape == (5, 6)


def test_gamma_varying_along_other_axes_stays_a_mul():
    """A [5, 1] gamma varies along axis 1, which is not normalized: the core fuses, Mul and Add stay."""
    model, stats = run_pass(_model(_layernorm(17), 17, gamma_shape=(5, 1)), "fuse_layernorm")
    assert stats.counts["layernorm_fused"] == 1
    assert ops(model) == ["Neg", "LayerNormalization", "Mul", "Add", "Neg"] and len(_ln(model).inputs) == 2


def test_float16():
    _, stats = run_pass(_model(_layernorm(17), 17, F16), "fuse_layernorm", F16)
    assert stats.counts["layernorm_fused"] == 1


def test_below_opset_17_left_and_noted():
    model, stats = run_pass(_model(_layernorm(13), 13), "fuse_layernorm")
    assert not stats.counts and stats.notes["layernorm_needs_opset_17"] == 1 and "Sqrt" in ops(model)


@pytest.mark.parametrize("case", ["middle_axis", "other_var_axes", "no_keepdims", "shared"])
def test_not_layernorm_kept(case):
    kwargs, gamma_shape, shape, extra = {}, (6,), SHAPE, []
    if case == "middle_axis":  # over axis 1 of 3: LayerNormalization normalizes trailing axes only
        kwargs, gamma_shape = {"axes": (1,)}, (5, 1)
    elif case == "other_var_axes":
        kwargs = {"axes": (-1,), "var_axes": (1, 2)}
    elif case == "no_keepdims":  # [6,6,6] - [6,6] broadcasts along the wrong axes: not a layer norm
        kwargs, shape = {"keepdims": 0}, [6, 6, 6]
    elif case == "shared":  # d is read by a third node
        extra = [helper.make_node("Relu", ["d"], ["z"])]
    nodes = _layernorm(17, **kwargs) + extra
    outputs = [("y", F32, shape)] + ([("z", F32, shape)] if extra else [])
    model, stats = run_pass(_model(nodes, 17, gamma_shape=gamma_shape, outputs=outputs, shape=shape),
                            "fuse_layernorm")
    assert not stats.counts and "LayerNormalization" not in ops(model)


def test_default_preset_fuses_at_opset_17():
    proto = _model(_layernorm(17), 17)
    model = model_io.load(proto)
    pipeline.Pipeline(pipeline.preset_steps("default")).run(model)
    assert "LayerNormalization" in ops(model) and "Sqrt" not in ops(model)


def test_quantize_fuses_layernorm_once_opset_allows(tmp_path):
    """A model at opset 17 with a Conv, a written-out layer norm over W and a Conv: quantize keeps one
    float LayerNormalization between the int8 convs."""
    nodes = [helper.make_node("Conv", ["in", "w1", "b1"], ["x"], pads=[1, 1, 1, 1]), *_layernorm(17),
             helper.make_node("Conv", ["h", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    consts = {"two": np.array(2.0, F32), "eps": np.array(1e-5, F32), "gamma": RNG.uniform(0.5, 1.5, 8).astype(F32),
              "beta": RNG.standard_normal(8).astype(F32),
              "w1": (RNG.standard_normal((4, 3, 3, 3)) * 0.3).astype(F32), "b1": RNG.standard_normal(4).astype(F32),
              "w2": (RNG.standard_normal((2, 4, 3, 3)) * 0.3).astype(F32), "b2": RNG.standard_normal(2).astype(F32)}
    proto = build(nodes, [("in", F32, [1, 3, 8, 8])], [("y", F32, [1, 2, 8, 8])], consts, opset=17)
    feeds = feeds_for(proto)
    result = onnxshrink.quantize(proto, feeds, tmp_path / "q.onnx", cache_dir=False, tune=False)
    saved = onnx.load(str(result.output))
    onnx.checker.check_model(saved, full_check=True)
    op_types = [n.op_type for n in saved.graph.node]
    assert op_types.count("LayerNormalization") == 1 and "Sqrt" not in op_types and "Pow" not in op_types
    assert cosine(ort_run(proto, feeds[0])[0], ort_run(result.output, feeds[0])[0]) > 0.99
