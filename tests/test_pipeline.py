"""The pass manager: order, fixed points, structural checks, drift probes, presets and recipes."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import onnxshrink
from onnxshrink import pipeline
from onnxshrink.errors import CheckFailure, ConfigError, DriftFailure, PassFailure
from onnxshrink.instruments import DriftProbe, StructuralCheck
from onnxshrink.pass_infra import Changes, ShrinkPass


def _chain_model(n: int = 4) -> ir.Model:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])], inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return ir.serde.deserialize_model(m)


CALLS: list[str] = []


class Recorder(ShrinkPass):
    """Records that it ran; changes nothing."""

    name = "recorder"

    @dataclasses.dataclass(frozen=True)
    class Config:
        tag: str = "r"

    def apply(self, model, stats):
        CALLS.append(self.config.tag)


class RemoveOneRelu(ShrinkPass):
    """Bypasses the first Relu it finds; a fixed-point loop runs it until none is left."""

    name = "remove_one_relu"
    changes = Changes.TOPOLOGY | Changes.NUMERICS
    lossy = True

    def apply(self, model, stats):
        from onnxshrink.graph_utils import bypass

        for node in model.graph:
            if node.op_type == "Relu":
                assert bypass(node, node.outputs[0], node.inputs[0]) is None
                stats.add("relu_removed")
                return


class DanglingPass(ShrinkPass):
    """Deliberately broken: removes a MatMul while its output is still used."""

    name = "dangling"

    def apply(self, model, stats):
        node = next(n for n in model.graph if n.op_type == "MatMul")
        model.graph.remove(node)  # not safe: consumers keep reading its output
        stats.add("nodes_removed")


class ScaleWeightPass(ShrinkPass):
    """Deliberately broken 'lossless' pass: doubles one weight; structure stays valid."""

    name = "scale_weight"
    changes = Changes.WEIGHTS

    def apply(self, model, stats):
        w = model.graph.initializers["w2"]
        w.const_value = ir.tensor(w.const_value.numpy() * 2.0, name="w2")
        stats.add("weights_scaled")


class RaisingPass(ShrinkPass):
    name = "raising"

    def apply(self, model, stats):
        raise ValueError("bug inside the pass")


def test_passes_run_in_order():
    CALLS.clear()
    steps = [Recorder(tag="a"), Recorder(tag="b"), Recorder(tag="c")]
    report = pipeline.Pipeline(steps).run(_chain_model())
    assert CALLS == ["a", "b", "c"]
    assert [r.name for r in report.records] == ["recorder"] * 3
    assert not report.changed


def test_fixed_point_repeats_until_nothing_changes():
    model = _chain_model(4)
    report = pipeline.Pipeline([pipeline.FixedPoint([RemoveOneRelu()])], [StructuralCheck()]).run(model)
    assert [n.op_type for n in model.graph].count("Relu") == 0
    assert report.iterations["remove_one_relu"] == 5  # 4 changing iterations + 1 that confirms
    assert report.per_pass()["remove_one_relu"]["counts"] == {"relu_removed": 4}


def test_fixed_point_iteration_cap():
    model = _chain_model(4)
    report = pipeline.Pipeline([pipeline.FixedPoint([RemoveOneRelu()], max_iterations=2)]).run(model)
    assert [n.op_type for n in model.graph].count("Relu") == 2
    assert report.iterations["remove_one_relu"] == 2


def test_structural_check_names_the_broken_pass():
    with pytest.raises(CheckFailure, match="dangling"):
        pipeline.Pipeline([DanglingPass()], [StructuralCheck()]).run(_chain_model())


def test_drift_probe_names_the_numerically_broken_pass():
    model = _chain_model()
    steps = [Recorder(), ScaleWeightPass()]
    with pytest.raises(DriftFailure, match="scale_weight"):
        pipeline.Pipeline(steps, [StructuralCheck(), DriftProbe()]).run(model)


def test_drift_probe_accepts_lossless_and_budgeted_lossy_passes():
    model = _chain_model(2)
    probe = DriftProbe(min_cosine=-1.0)  # removing Relus is lossy; a budget of -1 accepts anything
    pipeline.Pipeline([pipeline.FixedPoint([RemoveOneRelu()])], [probe]).run(model)
    assert probe.checked == ["remove_one_relu", "remove_one_relu"]
    strict = DriftProbe(min_cosine=0.999999)
    with pytest.raises(DriftFailure, match="cosine"):
        pipeline.Pipeline([RemoveOneRelu()], [strict]).run(_chain_model(2))


def test_check_each_through_the_api_catches_a_broken_pass():
    with pytest.raises(DriftFailure, match="scale_weight"):
        onnxshrink.optimize(_chain_model(), steps=[ScaleWeightPass()], check_each=True)


def test_exception_inside_pass_becomes_pass_failure():
    with pytest.raises(PassFailure, match="raising.*bug inside the pass"):
        pipeline.Pipeline([RaisingPass()]).run(_chain_model())


def test_bad_pass_options_and_unknown_names():
    with pytest.raises(ConfigError, match="bad options"):
        Recorder(nonsense=1)
    with pytest.raises(ConfigError, match="unknown pass"):
        pipeline.make_pass("no_such_pass")
    with pytest.raises(ConfigError, match="unknown preset"):
        pipeline.preset_steps("nope")
    with pytest.raises(ConfigError, match="only one"):
        onnxshrink.api.resolve_steps(preset="default", passes=["dead_code"])


def test_default_preset_is_lossless_fixed_point():
    steps = pipeline.preset_steps("default")
    assert len(steps) == 1 and isinstance(steps[0], pipeline.FixedPoint)
    names = [p.name for p in steps[0].passes]
    assert "dead_code" in names
    assert all(not p.lossy for p in steps[0].passes)


def test_recipe_file(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[step]]\npass = "dead_code"\nremove_functions = false\n\n'
        '[[step]]\nfixed_point = ["dead_code"]\nmax_iterations = 3\n'
    )
    steps = pipeline.load_recipe(recipe)
    assert steps[0].name == "dead_code" and steps[0].config.remove_functions is False
    assert isinstance(steps[1], pipeline.FixedPoint) and steps[1].max_iterations == 3


@pytest.mark.parametrize(
    "text, match",
    [
        ("[[step]]\npass = 'dead_code'\nbogus = 1\n", "bad options"),
        ("[[step]]\nfoo = 1\n", "needs 'pass' or 'fixed_point'"),
        ("steps = 1\n", "unknown keys"),
        ("[[step]\n", "not valid TOML"),
        ("", "no steps"),
    ],
)
def test_bad_recipes(tmp_path, text, match):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=match):
        pipeline.load_recipe(recipe)


def test_structural_check_tolerates_a_check_the_input_already_fails():
    model = _chain_model()
    # A value_info that contradicts the real shape makes strict shape inference fail on the input.
    value = model.graph.node(0).outputs[0]
    value.dtype = ir.DataType.FLOAT
    value.shape = ir.Shape(["N", 3])
    check = StructuralCheck()
    pipeline.Pipeline([RemoveOneRelu()], [check]).run(model)
    assert check.input_problems and "shape inference" in check.input_problems[0]


@pytest.mark.parametrize("line,match", [('keep_ops = "Conv"', "takes a list"),
                                        ('max_output_bytes = "5"', "takes a number"),
                                        ("inline_if = 1", "takes true or false")])
def test_recipe_options_of_the_wrong_kind_are_refused(tmp_path, line, match):
    """``keep_ops = "Conv"`` was accepted and read letter by letter (('C', 'o', 'n', 'v'))."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[step]]\npass = "fold_constants"\n{line}\n')
    with pytest.raises(ConfigError, match=match):
        pipeline.load_recipe(recipe)
    recipe.write_text('[[step]]\npass = "fold_constants"\nkeep_ops = ["Conv"]\n')
    assert pipeline.load_recipe(recipe)[0].config.keep_ops == ("Conv",)
