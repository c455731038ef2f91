"""explain: tensor mapping (names, Q/DQ pairs), the per-node ranking, external data, the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import explain
from onnxshrink.cli import main

WIDTH = 16
LAYERS = 20


def chain(*, corrupt: int | None = None, quantize: dict[int, float] | None = None, seed: int = 0):
    """``LAYERS`` x (MatMul -> Tanh) on [N, WIDTH]. ``corrupt``: that layer's weight gets one entry x50.
    ``quantize``: layer -> activation scale; those layers read int8 Q/DQ activations and weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        if i == corrupt:
            w[0, 0] *= 50
        a, wname = x, f"w{i}"
        if quantize and i in quantize:
            a, wname = _qdq(nodes, inits, i, x, w, quantize[i])
        else:
            inits.append(numpy_helper.from_array(w, wname))
        nodes.append(helper.make_node("MatMul", [a, wname], [f"mm{i}"], name=f"layer{i}/matmul"))
        nodes.append(helper.make_node("Tanh", [f"mm{i}"], [f"act{i}"], name=f"layer{i}/tanh"))
        x = f"act{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _qdq(nodes, inits, i, x, w, act_scale):
    """Q/DQ on the activation (new tensor names, as quantizers write them) and an int8 weight + DQ."""
    inits += [numpy_helper.from_array(np.array(act_scale, np.float32), f"s{i}"),
              numpy_helper.from_array(np.array(0, np.int8), f"z{i}")]
    nodes.append(helper.make_node("QuantizeLinear", [x, f"s{i}", f"z{i}"], [f"q_{i}"], name=f"q{i}"))
    nodes.append(helper.make_node("DequantizeLinear", [f"q_{i}", f"s{i}", f"z{i}"], [f"dq_{i}"], name=f"dq{i}"))
    ws = float(np.abs(w).max() / 127)
    inits += [numpy_helper.from_array(np.round(w / ws).astype(np.int8), f"wq{i}"),
              numpy_helper.from_array(np.array(ws, np.float32), f"ws{i}")]
    nodes.append(helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"z{i}"], [f"wdq_{i}"], name=f"wdq{i}"))
    return f"dq_{i}", f"wdq_{i}"


def feeds(n=3, batch=4):
    rng = np.random.default_rng(1)
    return [{"input": rng.standard_normal((batch, WIDTH)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("layer", [7, 16])
def test_a_corrupted_node_ranks_first(layer):
    report = explain.explain(chain(), chain(corrupt=layer), feeds(), threads=1)
    top = report.nodes[0]
    assert top.node == f"layer{layer}/matmul" and top.op_type == "MatMul"
    assert top.drop_db > 20 + max(n.drop_db for n in report.nodes[1:])
    assert report.batches == 3 and not report.unmatched
    # nodes before the corruption are untouched
    early = next(n for n in report.nodes if n.node == "layer0/matmul")
    assert early.sqnr_db == float("inf") and early.drop_db == 0


def test_identical_models_rank_no_drop():
    nodes = explain.rank_nodes(chain(), chain(), feeds(1), threads=1)
    assert len(nodes) == 2 * LAYERS
    assert all(n.drop_db == 0 for n in nodes)


def test_quantized_tensors_map_through_their_qdq_pair():
    good = {i: 0.02 for i in range(LAYERS)}
    cand = chain(quantize={**good, 11: 0.5})  # layer 11 reads its activation with a far too coarse scale
    ref_ir, cand_ir = ir.serde.deserialize_model(chain()), ir.serde.deserialize_model(cand)
    taps, unmatched = explain.map_tensors(ref_ir, cand_ir)
    assert not unmatched
    assert sorted(taps.values()) == sorted([f"mm{i}" for i in range(LAYERS)] + [f"act{i}" for i in range(LAYERS)])
    dq = next(n for n in cand_ir.graph if n.name == "dq11")
    assert explain.float_source(dq.outputs[0]).name == "act10"
    wdq = next(n for n in cand_ir.graph if n.name == "wdq11")
    assert explain.is_constant(wdq.outputs[0]) and not explain.is_constant(dq.outputs[0])

    report = explain.explain(chain(), cand, feeds(), threads=1)
    assert report.nodes[0].node == "layer11/matmul"
    assert report.nodes[0].inputs == ["act10"]  # the float tensor behind dq_11
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in report.nodes)


def test_external_data_is_referenced_not_copied(tmp_path, monkeypatch):
    written = []
    beside = explain._beside_weights
    monkeypatch.setattr(explain, "_beside_weights", lambda model: written.append(beside(model)) or written[-1])
    folder = tmp_path / "weights"
    folder.mkdir()
    for name, proto in (("ref", chain()), ("cand", chain(corrupt=3))):
        onnx.save(proto, folder / f"{name}.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{name}.data", size_threshold=0)
    before = sorted(os.listdir(folder))
    report = explain.explain(str(folder / "ref.onnx"), str(folder / "cand.onnx"), feeds(1), threads=1)
    assert report.nodes[0].node == "layer3/matmul"
    assert sorted(os.listdir(folder)) == before  # the tapped graphs were removed
    assert len(written) == 2 and all(p.parent == folder for p in written)  # saved beside the weights


def test_cli_explain_prints_offenders_and_writes_json(tmp_path, capsys):
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(chain(), ref)
    onnx.save(chain(corrupt=5), cand)
    out = tmp_path / "explain.json"
    rc = main(["explain", str(ref), str(cand), "--shape", "N=2", "--batches", "2", "--top", "3",
               "--threads", "1", "--json", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("layer5/matmul") and "MatMul" in lines[1] and "drop" in lines[1]
    assert len(lines) == 1 + 3
    doc = json.loads(out.read_text())
    assert doc["nodes"][0]["node"] == "layer5/matmul" and doc["batches"] == 2
    assert doc["tensors"]["act0"]["sqnr_db"] == "inf"


def test_labels_kept_with_the_data_are_ignored(tmp_path):
    data = tmp_path / "val.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((2, WIDTH)).astype(np.float32),
             labels=np.array([0, 1]))
    assert explain.rank_nodes(chain(), chain(corrupt=2), str(data), threads=1)[0].node == "layer2/matmul"


def test_a_quantized_graph_output_maps_to_its_float_source():
    """The QDQ pass hands a quantized graph output's name to its last DequantizeLinear; the layer that
    produces the float source must still be mapped and ranked."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    ref = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "ref", [x], [y],
        [numpy_helper.from_array(w, "w")]), opset_imports=[helper.make_opsetid("", 13)])
    cand = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["v"], name="mm"),
         helper.make_node("QuantizeLinear", ["v", "s", "z"], ["q"], name="q"),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
        "cand", [x], [y], [numpy_helper.from_array(w * 1.05, "w"), numpy_helper.from_array(np.float32(0.5), "s"),
                           numpy_helper.from_array(np.uint8(128), "z")]),
        opset_imports=[helper.make_opsetid("", 13)])
    data = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(3)]
    report = explain.explain(ref, cand, data)
    assert [n.node for n in report.nodes] == ["mm"]
    assert 20 < report.nodes[0].sqnr_db < 30  # its 5% weight error, measured on the float source v
    assert "v" not in report.unmatched


@pytest.mark.parametrize("name", ["demo", *sorted(__import__("models.zoo", fromlist=["ZOO"]).ZOO)])
def test_names_keep_their_meaning_through_the_lossless_passes(name):
    """Every tensor name the optimized model shares with the original holds the same values there, so
    ``explain original.onnx optimized-or-int8.onnx`` compares like with like. A fusion into an existing
    node (BatchNorm into its Conv) used to leave the Conv's own output name on the post-BatchNorm values,
    which explain then compared with the original's pre-BatchNorm tensor of that name."""
    import importlib.resources

    import onnxshrink
    from models import zoo

    if name == "demo":
        proto = onnx.load(str(importlib.resources.files("onnxshrink") / "bundled" / "demo.onnx"))
    else:
        proto = zoo.build(name)
    from onnxshrink import data, model_io

    optimized = onnxshrink.optimize(proto).model
    dims = {d: 2 for s in data.input_specs(model_io.load(proto)) for d in s.dims if isinstance(d, str)}
    report = explain.explain(proto, optimized, None, threads=1, batches=2, dims=dims or None)
    worst = min(report.tensors.values(), key=lambda t: t.sqnr_db)
    assert len(report.tensors) > 0
    assert worst.sqnr_db > 80, (worst.candidate, worst.sqnr_db)
