"""Latency- and MACs-budgeted pruning plans: the allocator, the cost model, the kernel table, the CLI flag."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnxshrink.passes.prune_channels import PruneChannelsPass

from models import zoo
from onnxshrink import checks, depgraph, kernel_table, model_io, ort_blocks, prune_alloc, prune_cost, stats
from onnxshrink.errors import ConfigError
from onnxshrink.importance import _cumulative
from onnxshrink.prune_plan import PruningPlan, plan_pruning


def _layer(name: str, macs: float, cout: int, group: int) -> prune_cost.LayerCost:
    """A 3x3 conv with 64 fixed inputs whose outputs are live group ``group``."""
    return prune_cost.LayerCost(name, "conv", int(macs), 64, cout, 16, prune_cost.Axis(cout, 0.0, [(group, cout)]),
                                prune_cost.Axis(64, 64.0, []), False)


def _toy(metric: str):
    """A narrow (32) and a wide (128) group; the wide one holds 0.8x the narrow one's MACs."""
    layers = [_layer("narrow", 1e6, 32, 0), _layer("wide", 0.8e6, 128, 1)]
    model = prune_cost.CostModel(layers, [32, 128], 0, kernel_table.DEFAULT, metric)
    cands = [prune_alloc.Candidate(n, [n, *range(n - 16, 15, -16)], prune_alloc.loss_curve(np.ones(n)))
             for n in (32, 128)]
    return model, cands


def test_latency_budget_cuts_wide_layers_where_the_kernel_curve_says_so():
    model, cands = _toy("latency")
    alloc = prune_alloc.allocate(model, cands, 0.85)
    assert alloc.reached and alloc.after <= alloc.budget
    assert alloc.keeps[0] == 32 and alloc.keeps[1] < 128  # 32 -> 16 would slow the narrow kernel down
    macs_model, cands = _toy("macs")
    by_macs = prune_alloc.allocate(macs_model, cands, 0.85)
    assert by_macs.keeps == [16, 128]  # per MAC the narrow group is the cheaper cut
    assert by_macs.after <= 0.85 * by_macs.before


def test_cost_model_pads_to_blocks_and_slows_narrow_kernels():
    table = kernel_table.DEFAULT
    layer = _layer("c", 64 * 64 * 9 * 256, 64, 0)
    f = np.array([1.0])
    full = layer.latency_us(f, table)
    assert layer.latency_us(np.array([0.5]), table) > full / 2  # 32 wide: slower per MAC
    assert layer.latency_us(np.array([40 / 64]), table) == pytest.approx(layer.latency_us(np.array([0.75]), table))
    assert layer.widths(np.array([0.5]))[1:] == (32, layer.macs / 2)


def test_loss_curves():
    additive = prune_alloc.loss_curve(np.array([3.0, 1.0, 0.0, 4.0]))
    assert additive.tolist() == [0.0, 0.0, 0.125, 0.5, 1.0]
    cumul = prune_alloc.loss_curve(np.array([0.2, 0.1, 0.5]), cumulative=True)
    assert cumul.tolist() == [0.0, 0.1, 0.2, 0.5]
    scores = np.array([2.0, 0.0, 1.0, 1.0])
    c = _cumulative(scores)
    assert np.array_equal(np.argsort(c, kind="stable"), np.argsort(scores, kind="stable"))
    assert c.max() == pytest.approx(1.0)


@pytest.mark.parametrize("target", ["latency", "macs"])
def test_budgeted_plan_respects_budget_rounding_min_width_and_protect(target):
    model = model_io.load(zoo.build("resnet"))
    plan = plan_pruning(model, 0.45, target=target, round_to=8, min_width=16, protect=["conv_4"], max_ratio=0.75)
    est = plan.settings["estimate"]
    key = "latency_us" if target == "latency" else "macs"
    assert est["reached"] and est["budget"] == pytest.approx(0.55 * est[key][0], rel=1e-4)
    assert est[key][1] <= est["budget"] * (1 + 1e-4)
    assert est["macs"][1] < est["macs"][0]
    by_producer = {p: g for g in plan.groups for p in g.producers}
    assert by_producer["conv_4"].status == "protected" and not by_producer["conv_4"].remove
    for g in plan.groups:
        if g.remove:
            assert g.kept_channels % 8 == 0 and g.kept_channels >= 16
            assert len(g.remove) <= 0.75 * g.atoms
    assert plan.settings["target"] == target and "budget 55% of unpruned" in plan.target_text()
    again = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert [g.remove for g in again.groups] == [g.remove for g in plan.groups]


def test_budgeted_plan_is_not_uniform_and_applies_cleanly(ort_run, make_feeds):
    proto = zoo.build("mobilenetv2")
    model = model_io.load(proto)
    macs0 = stats.macs(model)
    plan = plan_pruning(model, 0.4, target="macs", round_to=8, min_width=8)
    ratios = {round(len(g.remove) / g.atoms, 3) for g in plan.groups if g.status in ("pruned", "unchanged")}
    assert len(ratios) > 1
    before = stats.io_signature(model)
    PruneChannelsPass(plan=plan)(model)
    assert checks.check_structure(model)
    assert stats.io_signature(model) == before
    assert stats.macs(model) <= 0.6 * macs0 * 1.001  # the estimate counts what stats counts
    out = ort_run(model, make_feeds(proto, batch=2, n=1)[0])
    assert all(np.isfinite(v).all() for v in out.values())


def test_out_of_reach_budget_and_bad_settings_are_refused():
    model = model_io.load(zoo.build("mlp"))
    with pytest.raises(ConfigError, match="out of reach.*overhead"):
        plan_pruning(model, 0.9, target="latency", min_width=64)
    with pytest.raises(ConfigError, match="target"):
        plan_pruning(model, 0.3, target="flops")
    with pytest.raises(ConfigError, match="layer_ratios"):
        plan_pruning(model, 0.3, target="macs", layer_ratios={"*": 0.2})


def test_cost_model_layers_follow_groups():
    model = model_io.load(zoo.build("inception"))
    dg = depgraph.build(model)
    live = [g for g in dg.groups if not g.blocked]
    cost = prune_cost.build(model, dg, live, "default", "macs")
    full = [g.width for g in live]
    assert cost.total(full) == pytest.approx(stats.macs(model), rel=1e-6)
    concat_readers = [x for x in cost.layers if len(x.in_.terms) > 1]
    assert concat_readers  # a conv reading the Concat takes its input width from several groups
    half = [max(w // 2, 1) for w in full]
    assert cost.total(half) < 0.5 * cost.total(full)


def test_kernel_table_roundtrip_and_cache(tmp_path, monkeypatch):
    path = kernel_table.DEFAULT.save(tmp_path / "table.json")
    loaded = kernel_table.load(path)
    assert loaded.gmacs("conv", 64, 32, 16) == pytest.approx(kernel_table.DEFAULT.gmacs("conv", 64, 32, 16))
    here = kernel_table.load("default")
    assert here is kernel_table.load(None) and here.curves == kernel_table.DEFAULT.curves
    assert here.block == (ort_blocks.nchwc_block_size() or kernel_table.DEFAULT.block)
    assert kernel_table.DEFAULT.gmacs("conv", 64, 16, 16) < kernel_table.DEFAULT.gmacs("conv", 64, 128, 16)
    with pytest.raises(ConfigError, match="no such file"):
        kernel_table.load(tmp_path / "missing.json")
    calls = []

    def fake_measure(hws, batch=None):
        calls.append(hws)
        return kernel_table.KernelTable(kernel_table.DEFAULT.curves, source="measured")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_table, "measure", fake_measure)
    first = kernel_table.load("measure", hws=(8, 16))
    second = kernel_table.load("measure", hws=(16, 8))
    assert calls == [(8, 16)] and first.source == second.source and "cache" in second.source


def test_cli_prune_target(tmp_path, capsys):
    from onnxshrink.cli import main

    src = zoo.save("resnet", tmp_path)
    out, plan = tmp_path / "m.onnx", tmp_path / "plan.json"
    assert main(["optimize", str(src), "-o", str(out), "--prune", "0.4", "--prune-target", "latency",
                 "--round-to", "8", "--plan-out", str(plan)]) == 0
    text = capsys.readouterr().out
    assert "latency budget 60% of unpruned; estimated latency" in text and "at batch 1" in text
    assert json.loads(plan.read_text())["settings"]["target"] == "latency"
    assert main(["optimize", str(src), "--prune", "0.3", "--prune-measure"]) == 0
    text = capsys.readouterr().out
    assert "channels: 30% of each prunable group's" in text and "measured: latency" in text
    assert main(["optimize", str(src), "--prune", "0.3", "--prune-target", "latency",
                 "--kernel-table", str(tmp_path / "none.json")]) == 2


def test_pass_config_takes_the_target():
    model = model_io.load(zoo.build("plain_cnn"))
    result = PruneChannelsPass(ratio=0.4, target="macs", round_to=8)(model)
    assert result.modified and "MACs budget 60% of unpruned" in result.stats.notes["plan"]["target"]


POOL_NET = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 8, 16, 16] x) => (float[1, 16, 16, 16] y, float[1, 32, 16, 16] r2) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    ra = Relu (a)
    p = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (ra)
    y = Conv <pads = [1, 1, 1, 1]> (p, w2)
    b = Conv <pads = [1, 1, 1, 1]> (x, w3)
    r2 = Relu (b)
}
"""


def _pool_net():
    import onnx.parser
    from onnx import numpy_helper

    proto = onnx.parser.parse_model(POOL_NET)
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (32, 8, 3, 3)), ("w2", (16, 32, 3, 3)), ("w3", (32, 8, 3, 3))):
        proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return model_io.load(proto)


def test_memory_bound_nodes_scale_with_the_kept_channels_and_fused_ones_do_not():
    model = _pool_net()
    dg = depgraph.build(model)
    live = [g for g in dg.groups if not g.blocked]
    assert [g.width for g in live] == [32]  # w1 -> w2; w3's outputs are a graph output
    cost = prune_cost.build(model, dg, live, "default", "latency")
    nodes = [x for x in cost.layers if isinstance(x, prune_cost.NodeCost)]
    assert [n.name for n in nodes] == ["p"]  # the MaxPool; a Relu on a Conv's only use is fused
    pool, table = nodes[0], kernel_table.DEFAULT
    ns = table.memory_ns("MaxPool") + kernel_table.WINDOW_NS * 9
    for frac in (1.0, 0.5):
        assert pool.latency_us(np.array([frac]), table) == pytest.approx(table.node_us + ns * 32 * 256 * frac / 1e3)
    assert cost.other_nodes == 2  # both Relus: node_us each, whatever the widths
    assert cost.total([16]) < cost.total([32]) and cost.describe([16])["macs"] < cost.describe([32])["macs"]
    assert cost.delta([32], cost.layer_costs([32]), 0, 16)[0] == pytest.approx(cost.total([16]) - cost.total([32]))


def test_an_activation_on_a_shared_output_is_not_fused():
    model = _pool_net()
    a = next(n for n in model.graph if n.op_type == "Conv").outputs[0]
    extra = ir.node("Neg", [a])
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    extra.outputs[0].shape, extra.outputs[0].type = a.shape, a.type
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert not prune_cost._fused(relu)
    assert prune_cost._fused(next(n for n in model.graph if n.op_type == "Relu" and n is not relu))


def test_kernel_table_memory_costs_roundtrip(tmp_path):
    d = kernel_table.DEFAULT.to_dict()
    assert d["memory_ns"]["Concat"] == kernel_table.MEMORY_NS["Concat"]
    d["memory_ns"] = {"Concat": 2.0}
    table = kernel_table.KernelTable.from_dict(d)
    assert table.memory_ns("Concat") == 2.0 and table.memory_ns("Transpose") == kernel_table.MEMORY_NS["Transpose"]
    assert table.memory_ns("Add") == kernel_table.ELEMENTWISE_NS
    del d["memory_ns"]  # a table saved before memory costs existed
    assert kernel_table.KernelTable.from_dict(d).memory_ns("MaxPool") == kernel_table.MEMORY_NS["MaxPool"]


def _symbolic_hw_net() -> ir.Model:
    """Conv 3->32 at full resolution, then 32->64 and 64->64 at 1/4 and 1/16 (stride 4): input
    [N,3,H,W] with symbolic H and W, as PP-OCR exports are."""
    import onnx
    from onnx import numpy_helper

    text = """<ir_version: 8, opset_import: ["" : 17]>
    net (float[N,3,H,W] x) => (float[N,10] y) {
        a = Conv <pads = [1,1,1,1]> (x, w0, b0)
        ar = Relu (a)
        c = Conv <pads = [1,1,1,1], strides = [4,4]> (ar, w1, b1)
        cr = Relu (c)
        d = Conv <pads = [1,1,1,1], strides = [4,4]> (cr, w2, b2)
        dr = Relu (d)
        p = GlobalAveragePool (dr)
        f = Flatten (p)
        y = Gemm (f, wf, bf)
    }"""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    shapes = {"w0": (32, 3, 3, 3), "b0": (32,), "w1": (64, 32, 3, 3), "b1": (64,), "w2": (64, 64, 3, 3),
              "b2": (64,), "wf": (64, 10), "bf": (10,)}
    for name, shape in shapes.items():
        proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return ir.serde.deserialize_model(proto)


def test_estimates_are_taken_at_the_calibration_size_not_1x1():
    """Symbolic height and width used to count as 1: MACs and the planner's estimates were those of a
    1x1 image (the MACs target then cut the low-resolution layers that hold the parameters)."""
    from onnxshrink import pruning

    model = _symbolic_hw_net()
    calib = [{"x": np.random.default_rng(i).standard_normal((2, 3, 64, 64)).astype(np.float32)} for i in range(2)]
    real = stats.macs(model, {"x:2": 64, "x:3": 64})
    assert real > 10 * stats.macs(model)  # at 1x1 the full-resolution conv weighs nothing
    assert pruning.operating_dims(model, calib) == {"x:2": 64, "x:3": 64}
    res = pruning.prune(model.clone(), 0.3, criterion="activation", calibration=calib, target="macs", round_to=8)
    assert res.before["macs"] == real
    est = res.plan.settings["estimate"]["macs"]
    assert est[0] == pytest.approx(real, rel=1e-3)
    assert res.after["macs"] <= 0.7 * real * (1 + 1e-3)  # the budget holds at the size the model runs at
    first = next(g for g in res.plan.groups if g.atoms == 32)  # the only 32-wide group: conv 3->32's output
    assert first.remove  # the full-resolution group carries most MACs and is cut (at 1x1: kept whole)
    data_free = pruning.prune(model.clone(), 0.3, target="macs", round_to=8, dims={"x:2": 64, "x:3": 64})
    assert data_free.before["macs"] == real and data_free.after["macs"] <= 0.7 * real * (1 + 1e-3)


def test_cli_prune_shape(tmp_path, capsys):
    from onnxshrink.cli import main

    src = model_io.save(_symbolic_hw_net(), tmp_path / "net.onnx")
    report = tmp_path / "r.json"
    assert main(["optimize", str(src), "--prune", "0.3", "--prune-target", "macs", "--round-to", "8",
                 "--shape", "x:2=64", "--shape", "x:3=64", "--report", str(report)]) == 0
    assert "output drift against the unpruned model on 4 random feeds" in capsys.readouterr().out
    rep = json.loads(report.read_text())
    assert rep["drift"]["random_data"] and rep["drift"]["drift"] is not None
    assert rep["before"]["macs"] == stats.macs(_symbolic_hw_net(), {"x:2": 64, "x:3": 64})
    # without a size, random feeds would be 1x1 images: not measured, and a drift budget then fails
    assert main(["optimize", str(src), "--prune", "0.3", "--round-to", "8", "--max-drift", "0.5"]) == 1
    out = capsys.readouterr()
    assert "not measured: random feeds need the size of x:2, x:3" in out.out and "could not be measured" in out.err
    assert rep["after"]["macs"] <= 0.7 * rep["before"]["macs"] * (1 + 1e-3)


def test_estimates_are_taken_at_the_batch_given():
    """``--shape x:0=32`` plans for batch 32: MACs scale by 32, fixed overheads do not, and the plan's
    text names the batch (it used to say batch 1 whatever the dims)."""
    model = _symbolic_hw_net()
    hw = {"x:2": 32, "x:3": 32}
    one = plan_pruning(model, 0.3, target="latency", dims=hw).settings["estimate"]
    many = plan_pruning(model, 0.3, target="latency", dims={**hw, "x:0": 32})
    est = many.settings["estimate"]
    assert (one["batch"], est["batch"]) == (1, 32)
    assert est["macs"][0] == 32 * one["macs"][0]
    assert one["latency_us"][0] < est["latency_us"][0] < 32 * one["latency_us"][0]
    assert "at batch 32" in many.target_text()


def test_measured_kernel_table_is_taken_at_the_planning_batch(tmp_path, monkeypatch):
    """A measured table used to time small maps at up to 256 images a run whatever the batch the plan
    was for; it is now measured (and cached) at the planning batch."""
    _, feed, macs = kernel_table._layer_model("conv", 16, 32, 8, batch=1)
    assert feed["x"].shape == (1, 16, 8, 8) and macs == 8 * 8 * 32 * 16 * 9
    assert kernel_table._layer_model("conv", 16, 32, 8)[1]["x"].shape[0] == 64  # 4096 positions
    assert kernel_table.fingerprint((8,), batch=1) != kernel_table.fingerprint((8,), batch=32)
    assert kernel_table.fingerprint((8,)) != kernel_table.fingerprint((8,), batch=1)
    calls = []

    def fake_measure(hws, batch=None):
        calls.append((hws, batch))
        return kernel_table.KernelTable(kernel_table.DEFAULT.curves, source="measured")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_table, "measure", fake_measure)
    model = _symbolic_hw_net()
    hw = {"x:2": 32, "x:3": 32}
    plan_pruning(model, 0.3, target="latency", kernels="measure", dims=hw)
    plan_pruning(model, 0.3, target="latency", kernels="measure", dims={**hw, "x:0": 8})
    plan_pruning(model, 0.3, target="latency", kernels="measure", dims={**hw, "x:0": 8})  # cached
    assert [b for _, b in calls] == [1, 8]


def test_uniform_ratio_is_the_smallest_that_meets_the_budget():
    model = model_io.load(zoo.build("inception"))
    est = plan_pruning(model, 0.3, target="latency", round_to=8).settings["estimate"]
    r = est["uniform_ratio"]
    assert r is not None and 0 < r < 0.9

    def uniform_us(ratio):
        return plan_pruning(model, ratio, round_to=8).settings["estimate"]["latency_us"][1]

    assert uniform_us(r) <= est["budget"] * (1 + 1e-9) < uniform_us(round(r - 0.01, 2))
    assert "uniform_ratio" not in plan_pruning(model, 0.3, round_to=8).settings["estimate"]
    budgeted = plan_pruning(model, 0.3, target="latency", round_to=8)
    direct = plan_pruning(model, r, round_to=8)  # the uniform plan made from the same scores is this one
    assert budgeted.uniform.to_dict() == direct.to_dict() and budgeted.uniform.uniform is None
    assert "uniform" not in budgeted.to_dict() and budgeted.settings["target"] == "latency"
    assert PruningPlan.from_dict(budgeted.to_dict()).uniform is None
    macs = plan_pruning(model, 0.4, target="macs", round_to=8).settings["estimate"]
    m = macs["uniform_ratio"]
    assert plan_pruning(model, m, round_to=8).settings["estimate"]["macs"][1] <= macs["budget"] * (1 + 1e-9)


def _digits_prune(name, ratio, tmp_path, **kw):
    from models import digits
    from onnxshrink import pruning

    calib = digits.feeds(name, "calib", batch=64, limit=256)
    res = pruning.prune(digits.trained_path(name), ratio, tmp_path / "out.onnx", target="latency",
                        criterion="reconstruction", reconstruct="lsq", calibration=calib,
                        plan_out=tmp_path / "plan.json", **kw)
    return res, calib


def test_budgeted_plan_loses_to_the_uniform_one_where_it_drifts_more(tmp_path):
    """Digits inception at a 62% latency budget: the allocator cuts one 32-channel group to 8, and the
    compounded loss is far above the uniform plan's at the same estimate; the uniform plan is kept,
    judged on a held-out feed and then refit on every feed."""
    from models import digits
    from onnxshrink import pruning
    from onnxshrink.validate import FeedsDrift

    res, calib = _digits_prune("inception", 0.38, tmp_path)
    check = res.plan.settings["check"]
    drift = {t["plan"]: t["drift"] for t in check["tried"]}
    assert check["kept"] == "uniform" and drift["uniform"] < 0.98 * drift["allocated"]
    assert check["held_out"] and check["feeds"] == 1  # a quarter of 4 feeds
    assert res.plan.settings["target"] == "channels" and res.plan.settings["ratio"] == check["tried"][0]["uniform_ratio"]
    assert "asked: latency budget 62% of unpruned, uniform widths kept" in res.plan.target_text()
    assert "(1 held-out calibration feed)" in res.plan.target_text()
    assert json.loads((tmp_path / "plan.json").read_text())["settings"]["check"]["kept"] == "uniform"
    assert any(r["out"][1] < r["out"][0] for r in res.layers)  # the table follows the kept model
    judge = FeedsDrift(model_io.load(digits.trained_path("inception")), calib, 8)
    again = pruning.prune(digits.trained_path("inception"), 0.0, plan=tmp_path / "plan.json", reconstruct="lsq",
                          calibration=calib)
    assert judge(res.model) == pytest.approx(judge(again.model), rel=1e-4, abs=1e-7)  # refit on every feed
    assert judge(str(tmp_path / "out.onnx")) == pytest.approx(judge(res.model), rel=1e-4, abs=1e-7)
    off, _ = _digits_prune("inception", 0.38, tmp_path, uniform_check=False)
    assert "check" not in off.plan.settings and off.plan.settings["target"] == "latency"
    assert judge(off.model) > 1.5 * judge(res.model)


def test_feed_subsets_and_held_out_counts():
    from models import digits
    from onnxshrink import data, pruning

    src = data.feeds(digits.feeds("cnn", "calib", batch=32, limit=320), model_io.load(digits.trained_path("cnn")))
    feeds = [f["input"] for f in src]
    head, rest = src.subset(0, 2), src.subset(2)
    assert len(head) == 2 and len(rest) == 8 and len(src.subset(8, 20)) == 2
    assert all(np.array_equal(a["input"], b) for a, b in zip(head, feeds[:2]))
    assert all(np.array_equal(a["input"], b) for a, b in zip(rest, feeds[2:]))
    assert head.fingerprint() != rest.fingerprint()
    many = data.feeds(digits.feeds("cnn", "calib", batch=4, limit=256), model_io.load(digits.trained_path("cnn")))
    assert [pruning._held_out(many.subset(0, n)) for n in (3, 4, 10, 64)] == [0, 1, 2, 8]


def test_budgeted_plan_is_kept_where_it_drifts_less(tmp_path):
    """The digits ViT at a 70% latency budget: the allocated widths drift far less than the uniform ones."""
    res, _ = _digits_prune("vit", 0.3, tmp_path)
    check = res.plan.settings["check"]
    drift = {t["plan"]: t["drift"] for t in check["tried"]}
    assert check["kept"] == "allocated" and drift["allocated"] < drift["uniform"]
    assert res.plan.settings["target"] == "latency" and "allocated widths kept" in res.plan.target_text()


def test_cli_reports_the_uniform_check(tmp_path, capsys):
    from models import digits
    from onnxshrink.cli import main

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(digits.feeds("inception", "calib", batch=64, limit=256)):
        np.savez(calib / f"{i}.npz", **feed)
    report = tmp_path / "report.json"
    args = ["optimize", str(digits.trained_path("inception")), "-o", str(tmp_path / "m.onnx"), "--prune", "0.38",
            "--prune-target", "latency", "--prune-criterion", "reconstruction", "--reconstruct",
            "--calibration", str(calib)]
    assert main([*args, "--report", str(report)]) == 0
    assert "uniform widths kept: drift" in capsys.readouterr().out
    assert json.loads(report.read_text())["plan"]["check"]["kept"] == "uniform"
    assert main([*args, "--no-uniform-check"]) == 0
    assert "widths kept" not in capsys.readouterr().out
    assert main(["optimize", str(digits.trained_path("inception")), "-o", str(tmp_path / "n.onnx"),
                 "--no-uniform-check"]) == 2
    assert "--no-uniform-check" in capsys.readouterr().err


def test_uniform_check_without_reconstruction_judges_on_the_calibration_feeds(tmp_path):
    from models import digits
    from onnxshrink import pruning

    calib = digits.feeds("inception", "calib", batch=64, limit=256)
    res = pruning.prune(digits.trained_path("inception"), 0.38, None, target="latency", criterion="activation",
                        calibration=calib)
    check = res.plan.settings["check"]
    assert not check["held_out"] and check["feeds"] == 4 and res.reconstruction is None
    drift = {t["plan"]: t["drift"] for t in check["tried"]}
    assert res.plan.settings["target"] == ("channels" if check["kept"] == "uniform" else "latency")
    assert (check["kept"] == "uniform") == (drift["uniform"] < 0.8 * drift["allocated"])
    assert sum(r["out"][1] < r["out"][0] for r in res.layers) > 0
