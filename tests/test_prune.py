"""The prune_channels pass, plans and the prune() API on every zoo architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnxshrink.passes.prune_channels import PruneChannelsPass

from models import zoo
from onnxshrink import checks, depgraph, model_io, pruning, stats
from onnxshrink.depgraph import is_const, weight_axes
from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import const_array
from onnxshrink.prune_plan import PruningPlan, match_groups, plan_pruning

ARCHS = ["resnet", "mobilenetv2", "inception", "grouped_conv", "split_branches", "mlp", "transformer",
         "densenet", "plain_cnn", "dynamic_batch"]


def masked_original(name: str, plan: PruningPlan):
    """The original model with the consumer weight columns of every removed atom set to zero: what the
    pruned model must compute exactly when coupled channels were removed consistently."""
    model = model_io.load(zoo.build(name))
    dg = depgraph.build(model, grouped=plan.settings.get("grouped", "auto"))
    zeroed = 0
    for g, gp in match_groups(plan, dg):
        for i in gp.remove:
            for slot, cells in g.atoms[i].items():
                if not is_const(slot.value) or not _is_consumer_slot(slot):
                    continue
                arr = const_array(slot.value).copy()
                np.moveaxis(arr, slot.axes[0], 0)[cells] = 0
                slot.value.const_value = model_io.ir.tensor(arr, name=slot.value.name)
                zeroed += 1
    return model, zeroed


def _is_consumer_slot(slot) -> bool:
    return any((ax := weight_axes(u.node, u.idx)) is not None and slot.axes == (ax[1],)
               for u in slot.value.uses())


def io_signature(model):
    return stats.io_signature(model)


@pytest.mark.parametrize("name", ARCHS)
def test_ratio_zero_changes_nothing(name, ort_run, assert_close, make_feeds):
    proto = zoo.build(name)
    model = model_io.load(zoo.build(name))
    result = PruneChannelsPass(ratio=0.0)(model)
    assert not result.modified
    feed = make_feeds(proto, batch=2, n=1)[0]
    assert_close(ort_run(model, feed), ort_run(proto, feed), rtol=0, atol=0)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", ARCHS)
def test_pruned_model_is_valid_and_consistent(name, ratio, ort_run, assert_close, make_feeds):
    proto = zoo.build(name)
    model = model_io.load(zoo.build(name))
    plan = plan_pruning(model, ratio, round_to=4, min_width=4)
    before = io_signature(model)
    result = PruneChannelsPass(plan=plan)(model)
    assert result.modified and result.stats.counts["channels_pruned"] > 0
    report = checks.check_structure(model)
    assert report, report.problems
    assert io_signature(model) == before
    reference, zeroed = masked_original(name, plan)
    assert zeroed > 0
    feed = make_feeds(proto, batch=3, n=1)[0]
    assert_close(ort_run(model, feed), ort_run(reference, feed), rtol=1e-4, atol=1e-4)
    assert stats.parameter_count(model) < stats.parameter_count(model_io.load(proto))


def test_widths_are_rounded_and_bounded():
    from onnxshrink.prune_plan import default_round_to

    assert default_round_to() in (8, 16)
    model = model_io.load(zoo.build("resnet"))
    plan = plan_pruning(model, 0.3, round_to=8, min_width=8)
    for g in plan.groups:
        if g.status == "pruned":
            assert g.kept_channels % 8 == 0 and g.kept_channels >= 8
    narrow = plan_pruning(model, 0.9, round_to=16, min_width=32)
    assert all(g.kept_channels >= 32 for g in narrow.groups if g.remove)


def test_nchwc_block_is_asked_of_onnxruntime():
    from onnx import helper

    from onnxshrink import ort_blocks

    block = ort_blocks.nchwc_block_size()
    assert block in (1, 8, 16)
    assert ort_blocks.default_round_to() == max(block, 8)
    if block > 1:  # ORT's own choice agrees with the CPU flags it is derived from (x86 only)
        assert block == ort_blocks._cpuinfo_guess()
    w = helper.make_tensor("w16", 1, [16, 2, 1, 1], [0.0] * 32)
    blocked = helper.make_graph([helper.make_node("Conv", ["x", "w16"], ["y"], domain="com.microsoft.nchwc")],
                                "g", [], [], [w])
    plain = helper.make_graph([helper.make_node("Conv", ["x", "w16"], ["y"])], "g", [], [], [w])
    assert ort_blocks._padded_output_channels(helper.make_model(blocked)) == 16
    assert ort_blocks._padded_output_channels(helper.make_model(plain)) == 1


def test_protect_and_layer_ratios():
    model = model_io.load(zoo.build("resnet"))
    plan = plan_pruning(model, 0.5, protect=["conv_1"], layer_ratios={"conv_6": 0.25})
    by_producer = {tuple(g.producers): g for g in plan.groups}
    assert by_producer[("conv_1",)].status == "protected" and not by_producer[("conv_1",)].remove
    assert len(by_producer[("conv_6",)].remove) == 16  # 25% of 64
    assert len(by_producer[("conv_3",)].remove) == 32


def test_patterns_that_match_nothing_are_named(caplog):
    model = model_io.load(zoo.build("resnet"))
    with caplog.at_level("WARNING", logger="onnxshrink.prune_plan"):
        plan = plan_pruning(model, 0.5, protect=["conv_1", "Conv_1"], layer_ratios={"conv6": 0.25})
    text = caplog.text
    assert "protect pattern 'Conv_1' matches no node" in text and "'conv_1'" not in text
    assert "layer_ratios pattern 'conv6' matches no producer" in text
    assert {g.status for g in plan.groups if g.producers == ["conv_1"]} == {"protected"}


def test_global_scope_removes_about_the_ratio():
    model = model_io.load(zoo.build("inception"))
    plan = plan_pruning(model, 0.4, scope="global", round_to=0, min_width=1)
    live = [g for g in plan.groups if g.status in ("pruned", "unchanged")]
    total = sum(g.atoms * g.channels_per_atom for g in live)
    removed = sum(len(g.remove) * g.channels_per_atom for g in live)
    assert 0.3 <= removed / total <= 0.5
    assert len({len(g.remove) / g.atoms for g in live}) > 1  # not the same ratio everywhere


def test_plan_roundtrip_and_hand_edit(tmp_path, ort_run, assert_close, make_feeds):
    model = model_io.load(zoo.build("resnet"))
    plan = plan_pruning(model, 0.3)
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    stem = next(g for g in data["groups"] if "conv_0" in g["producers"])
    stem["remove"] = list(range(8))  # a user keeps the last 24 stem channels instead
    path.write_text(json.dumps(data))
    edited = PruningPlan.load(path)
    pruned = model_io.load(zoo.build("resnet"))
    result = PruneChannelsPass(plan=str(path))(pruned)
    assert result.stats.notes["kept"]["conv_0_out"]["1"] == list(range(8, 32))
    reference, _ = masked_original("resnet", edited)
    feed = make_feeds(zoo.build("resnet"), batch=2, n=1)[0]
    assert_close(ort_run(pruned, feed), ort_run(reference, feed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("remove", [[1, 1, 1], None, [1.5], [True], "0,1"])
def test_hand_edited_remove_lists_are_checked(remove, tmp_path):
    """A repeated index was accepted (the message said 'distinct'); null, floats or a string ended in
    'pass prune_channels failed: TypeError'."""
    plan = plan_pruning(model_io.load(zoo.build("resnet")), 0.3)
    data = plan.to_dict()
    next(g for g in data["groups"] if "conv_0" in g["producers"])["remove"] = remove
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="remove must be distinct atom indices"):
        PruneChannelsPass(plan=str(path))(model_io.load(zoo.build("resnet")))


def test_plan_for_another_model_is_refused():
    plan = plan_pruning(model_io.load(zoo.build("resnet")), 0.3)
    with pytest.raises(ConfigError, match="does not match this model"):
        PruneChannelsPass(plan=plan)(model_io.load(zoo.build("plain_cnn")))


def test_attention_head_count_constant_is_rewritten(ort_run, make_feeds):
    model = model_io.load(zoo.build("transformer"))
    plan = plan_pruning(model, 0.3)
    heads = [g for g in plan.groups if g.atoms == 4]
    assert all(len(g.remove) == 1 for g in heads)  # 4 heads -> 3
    PruneChannelsPass(plan=plan)(model)
    reshapes = [n for n in model.graph if n.op_type == "Reshape"]
    targets = []
    for node in reshapes:
        concat = node.inputs[1].producer()
        targets.append(const_array(concat.inputs[-1]).tolist())
    assert targets.count([3, 16]) == 6  # q, k, v in both blocks: 3 heads of 16
    assert targets.count([48]) == 2  # the merge back to 3 * 16 features
    out = ort_run(model, make_feeds(zoo.build("transformer"), batch=2, n=1)[0])
    assert out["output"].shape == (2, 16, 64)


def _picked_row_net():
    """fc1 -> Relu -> Reshape to [N, 3, 16] -> Gather row 2 -> fc2: rows 0 and 1 feed nothing."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array([0, 3, 16], np.int64), "shp"),
             numpy_helper.from_array(np.array(2, np.int64), "idx"),
             numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "shp"], ["rs"], name="split3"),
             helper.make_node("Gather", ["rs", "idx"], ["g"], axis=1, name="pick"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "pick", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_gathered_index_follows_the_rows_removed_before_it(ort_run, make_feeds):
    """Rows 0 and 1 of the reshaped features feed nothing and form one group; removing either moves
    the Gather's scalar index from 2 to 1 (left at 2 it would read past the 2 rows left)."""
    proto = _picked_row_net()
    feed = make_feeds(proto, batch=3, n=1)[0]
    want = ort_run(proto, feed)["y"]
    result = pruning.prune(proto, 0.5, round_to=1, min_width=1)
    dead = [g for g in result.plan.groups if g.atoms == 2 and g.consumers == []]
    assert len(dead) == 1 and len(dead[0].remove) == 1
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    reshape = next(n for n in result.model.graph if n.op_type == "Reshape")
    assert int(const_array(gather.inputs[1])) == 1
    assert const_array(reshape.inputs[1]).tolist() == [0, 2, 16]
    assert result.after["parameters"] == result.before["parameters"] - 32 * 16
    np.testing.assert_allclose(ort_run(result.model, feed)["y"], want, rtol=1e-5, atol=1e-5)


def test_blocked_groups_stay_whole():
    model = model_io.load(zoo.build("control_flow"))
    plan = plan_pruning(model, 0.5)
    assert all(g.status == "blocked" and g.stops for g in plan.groups)
    assert not PruneChannelsPass(plan=plan)(model).modified


def test_prune_api_with_table_and_preset(tmp_path):
    src = zoo.save("resnet", tmp_path)
    result = pruning.prune(src, 0.5, tmp_path / "out.onnx", round_to=8, plan_out=tmp_path / "plan.json")
    assert (tmp_path / "out.onnx").exists() and (tmp_path / "plan.json").exists()
    assert result.after["macs"] < 0.5 * result.before["macs"]
    rows = {r["layer"]: r for r in result.layers}
    assert rows["conv_1"]["out"] == [32, 16] and rows["conv_1"]["macs"][1] < rows["conv_1"]["macs"][0]
    table = pruning.format_layers(result.layers)
    assert "32 -> 16" in table and "total" in table
    assert "BatchNormalization" not in result.after["ops"]  # lossless passes ran afterwards
    from onnxshrink import api

    preset = api.optimize(src, preset="prune")
    assert preset.after["parameters"] < preset.before["parameters"]


def test_cli_prune(tmp_path, capsys):
    from onnxshrink.cli import main

    src = zoo.save("mobilenetv2", tmp_path)
    out, plan = tmp_path / "m.onnx", tmp_path / "plan.json"
    assert main(["optimize", str(src), "-o", str(out), "--prune", "0.3", "--round-to", "8",
                 "--protect", "conv_10", "--plan-out", str(plan)]) == 0
    text = capsys.readouterr().out
    assert "channels removed" in text and "graph inputs and outputs never change" in text
    assert main(["optimize", str(src), "-o", str(tmp_path / "again.onnx"), "--plan-in", str(plan)]) == 0
    a, b = model_io.load(out), model_io.load(tmp_path / "again.onnx")
    assert stats.parameter_count(a) == stats.parameter_count(b)
    assert main(["optimize", str(src), "--prune", "0.3", "--prune-criterion", "activation"]) == 2


def test_groups_kept_whole_by_rounding_say_why(tmp_path, capsys):
    """30% of a 16-wide group leaves 11.2 channels, which round back up to 16: the run removed nothing
    and used to say only '0 channels removed'. The plan and the summary now name each such group."""
    from onnxshrink.cli import main

    src = zoo.save("plain_cnn", tmp_path)
    plan = plan_pruning(model_io.load(src), 0.3, round_to=16)
    whole = [g for g in plan.groups if g.status == "unchanged"]
    assert whole and all("rounded up to a multiple of 16" in g.stops[0] for g in whole), whole
    assert not [g for g in plan_pruning(model_io.load(src), 0.3, round_to=8).groups
                if g.status == "unchanged" and g.stops]  # rounding to 8 prunes what 16 kept whole
    assert main(["optimize", str(src), "-o", str(tmp_path / "p.onnx"), "--prune", "0.3", "--round-to", "16"]) == 0
    text = capsys.readouterr().out
    assert f"not pruned: {whole[0].stops[0]}" in text
    assert "value 'logits': graph inputs and outputs never change" in text


def test_a_plan_estimated_slower_than_unpruned_is_warned(caplog):
    """Unrounded widths (--round-to 0) of resnet at 0.1: the kernel table prices them above the unpruned
    model (ORT's padded conv blocks); the plan stands, with a warning that names the way out."""
    model = zoo.build("resnet")
    with caplog.at_level("WARNING", logger="onnxshrink.prune_plan"):
        plan = plan_pruning(model_io.load(model), 0.1, round_to=0)
    lat = plan.settings["estimate"]["latency_us"]
    assert lat[1] > lat[0] and plan.pruned
    assert "SLOWER than the unpruned one" in caplog.text and "--prune-target latency" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnxshrink.prune_plan"):
        plan = plan_pruning(model_io.load(model), 0.5, round_to=16)
    lat = plan.settings["estimate"]["latency_us"]
    assert lat[1] < lat[0] and "SLOWER" not in caplog.text


def test_cli_prune_reports_drift_and_max_drift_fails(tmp_path, capsys):
    """Data-free pruning can break a trained model without a word (PP-OCR's detector at 0.3,
    prune_real.md); the CLI measures the pruned outputs against the input's, warns, and fails on --max-drift."""
    from models import digits
    from onnxshrink.cli import main

    src, out, rep = digits.trained_path("cnn"), tmp_path / "p.onnx", tmp_path / "r.json"
    x, _ = digits.load_split("calib")
    np.savez(tmp_path / "calib.npz", input=x[:64])
    assert main(["optimize", str(src), "-o", str(out), "--prune", "0.5", "--max-drift", "1e-6",
                 "--report", str(rep)]) == 1
    captured = capsys.readouterr()
    assert "over --max-drift" in captured.err and out.exists()  # written: the budget, not the rewrite, failed
    drift = json.loads(rep.read_text())["drift"]
    assert drift["random_data"] and drift["drift"] > 1e-6
    assert main(["optimize", str(src), "-o", str(out), "--prune", "0.5", "--calibration",
                 str(tmp_path / "calib.npz"), "--prune-criterion", "reconstruction", "--reconstruct",
                 "--drift-data", str(tmp_path / "calib.npz"), "--max-drift", "0.5", "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "output drift against the unpruned model on 64 feeds of" in text
    assert 0 < json.loads(rep.read_text())["drift"]["drift"] < 0.5
    # where the time went, in order: statistics for the criterion, then the plan and its refit
    phases = json.loads(rep.read_text())["phases"]
    assert list(phases)[:3] == ["load and prepare", "importance", "plan"] and list(phases)[-2:] == ["cleanup", "save"]
    assert any("refit" in name for name in phases) and all(v >= 0 for v in phases.values())
    assert "  time: load and prepare " in text
    assert main(["optimize", str(src), "--preset", "prune"]) == 0  # the data-free preset says it too
    text = capsys.readouterr().out
    assert "channels removed" in text and "output drift against the unpruned model on 4 random feeds" in text


def test_constant_node_weights_and_opset11_split_attribute(ort_run):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((32, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((8, 16, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
        helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Split", ["r"], ["s0", "s1"], axis=1, split=[16, 16]),
        helper.make_node("Mul", ["s0", "s1"], ["m"]),
        helper.make_node("Conv", ["m", "w2"], ["y"], kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], [numpy_helper.from_array(w2, "w2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 7
    model = model_io.load(proto)
    plan = plan_pruning(model, 0.5, round_to=4, min_width=4)
    pair = next(g for g in plan.groups if g.status == "pruned")
    assert pair.atoms == 16 and len(pair.remove) == 8  # Mul(s0, s1) ties channel c to 16 + c
    PruneChannelsPass(plan=plan)(model)
    assert checks.check_structure(model)
    split = next(n for n in model.graph if n.op_type == "Split")
    assert list(split.attributes["split"].value) == [8, 8]
    assert const_array(next(n for n in model.graph if n.op_type == "Constant").outputs[0]).shape == (16, 3, 3, 3)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert ort_run(model, {"x": x})["y"].shape == (2, 8, 8, 8)


def test_prune_builds_the_dependency_graph_once(monkeypatch):
    """Planning and the pass share one dependency graph (the pass built it a second time)."""
    calls = []
    real = depgraph.build
    monkeypatch.setattr(depgraph, "build", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = pruning.prune(zoo.build("resnet"), 0.5, round_to=8)
    assert result.plan.summary()["status"].get("pruned") and len(calls) == 1


def test_weights_from_external_data_are_sliced_when_read(tmp_path):
    """Pruning a model whose weights are external data keeps no sliced copy in memory: each weight is
    a LazyTensor over the memory-mapped original until the save writes it. The written model computes
    exactly what the same model pruned in memory computes."""
    import onnx
    import onnx_ir as ir

    from models import digits
    from onnxshrink import runtime

    src = tmp_path / "cnn.onnx"
    onnx.save(onnx.load(str(digits.trained_path("cnn"))), src, save_as_external_data=True,
              location="cnn.data", size_threshold=0)
    lazy = pruning.prune(src, 0.3, tmp_path / "p.onnx")
    eager = pruning.prune(onnx.load(str(digits.trained_path("cnn"))), 0.3)
    assert not any(isinstance(v.const_value, ir.LazyTensor) for v in eager.model.graph.initializers.values())
    assert lazy.plan.summary()["channels_removed"] == eager.plan.summary()["channels_removed"] > 0
    x, _ = digits.model_input("cnn", "test")
    got = runtime.make_session(lazy.output, threads=1).run(None, {"input": x[:32]})[0]
    want = runtime.make_session(eager.model, threads=1).run(None, {"input": x[:32]})[0]
    np.testing.assert_array_equal(got, want)
    again = pruning.prune(src, 0.3, lossless=False)  # not saved, BatchNorm not folded: every cut is lazy
    before = {v.name: v.const_value.shape for v in model_io.load(src).graph.initializers.values()}
    cut = [v for v in again.model.graph.initializers.values() if v.const_value.shape != before[v.name]]
    assert len(cut) >= 8 and all(isinstance(v.const_value, ir.LazyTensor) for v in cut)


def test_weight_norms_over_blocks_equal_the_whole_weight(monkeypatch):
    """``cell_norms`` sums blocks of the leading axis (bounded float64 copies); any block size gives
    the same norms, on either axis of the slot."""
    from onnxshrink import importance

    model = model_io.load(zoo.build("resnet"))
    dg = depgraph.build(model)
    slots = [s for g in dg.groups for s, _, _ in importance.weight_slots(g)]
    assert {s.axes[0] for s in slots} == {0, 1}
    whole = [importance.cell_norms(s, p) for s in slots for p in (1, 2)]
    monkeypatch.setattr(importance, "NORM_CHUNK", 7)
    blocks = [importance.cell_norms(s, p) for s in slots for p in (1, 2)]
    for a, b in zip(whole, blocks):
        np.testing.assert_allclose(a, b, rtol=1e-12)
