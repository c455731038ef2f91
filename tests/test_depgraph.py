"""Dependency groups of the pruning graph, per architecture pattern, and the barriers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxshrink.passes.prune_channels import PruneChannelsPass

from models import zoo
from onnxshrink import checks, depgraph, model_io
from onnxshrink.channel_layout import segments
from onnxshrink.depgraph_cells import union_find
from onnxshrink.graph_utils import const_array
from onnxshrink.prune_plan import plan_pruning


def graph_of(name: str, **kw) -> depgraph.DepGraph:
    return depgraph.build(model_io.load(zoo.build(name)), **kw)


def group_with(dg, producer: str) -> depgraph.Group:
    hits = [g for g in dg.groups if producer in g.producers]
    assert len(hits) == 1, f"{producer} is in {len(hits)} groups"
    return hits[0]


def weight_cells(g: depgraph.Group, name: str, axis: int) -> list[list[int]]:
    """Per atom, the cells of weight initializer ``name`` along ``axis``."""
    slot = next(s for s in g.slots if s.value.name == name and s.axes == (axis,))
    return [a[slot].tolist() for a in g.atoms]


def conv_weight(model, node_name: str) -> str:
    return next(n for n in model.graph if n.name == node_name).inputs[1].name


def test_residual_couples_every_add_operand():
    dg = graph_of("resnet")
    stem = group_with(dg, "conv_0")
    assert set(stem.producers) == {"conv_0", "conv_2"}  # stem and the identity block's second conv
    assert set(stem.consumers) == {"conv_1", "conv_3", "conv_5"}  # next block's conv1 and 1x1 shortcut
    proj = group_with(dg, "conv_4")
    assert set(proj.producers) == {"conv_4", "conv_5", "conv_7"}
    assert set(proj.consumers) == {"conv_6", "gemm_0"}
    assert not stem.blocked and stem.width == 32 and stem.channels_per_atom() == 1
    inner = group_with(dg, "conv_1")
    assert inner.producers == ["conv_1"] and inner.consumers == ["conv_2"]


def test_depthwise_ties_input_and_output_channels():
    dg = graph_of("mobilenetv2")
    expand = group_with(dg, "conv_1")
    assert set(expand.producers) == {"conv_1", "conv_2"}  # 1x1 expand and the depthwise conv
    assert expand.consumers == ["conv_3"]
    dw = conv_weight(dg.model, "conv_2")
    assert weight_cells(expand, dw, 0)[:3] == [[0], [1], [2]]
    assert set(group_with(dg, "conv_0").producers) == {"conv_0", "conv_3"}  # inverted residual


def test_concat_offsets():
    dg = graph_of("inception")
    concat = next(n for n in dg.model.graph if n.op_type == "Concat")
    out = concat.outputs[0]
    offsets = {"conv_1": (0, 16), "conv_3": (16, 40), "conv_6": (40, 52), "conv_7": (52, 64)}
    for producer, (lo, hi) in offsets.items():
        g = group_with(dg, producer)
        slot = next(s for s in g.slots if s.value is out and s.axes == (1,))
        cells = sorted(c for a in g.atoms for c in a[slot].tolist())
        assert cells == list(range(lo, hi)), producer
        assert set(g.consumers) == {"conv_8", "conv_9", "conv_11", "conv_14"}


def test_split_and_slice_ranges():
    dg = graph_of("split_branches")
    glu = next(g for g in dg.groups if g.producers == ["conv_0"] and g.consumers == ["conv_2"])
    w0 = conv_weight(dg.model, "conv_0")
    assert weight_cells(glu, w0, 0)[:2] == [[0, 16], [1, 17]]  # Mul(s0, sigmoid(s1)) pairs channels
    path = next(g for g in dg.groups if g.producers == ["conv_0"] and g.consumers == ["conv_1"])
    assert [c for a in weight_cells(path, w0, 0) for c in a] == list(range(32, 48))
    hi = group_with(dg, "conv_3")  # Slice [32:64] of conv_2 added to conv_3's output
    w2 = conv_weight(dg.model, "conv_2")
    assert [c for a in weight_cells(hi, w2, 0) for c in a] == list(range(32, 64))


def test_grouped_conv_prunes_same_positions_in_every_group():
    dg = graph_of("grouped_conv")
    residual = group_with(dg, "conv_0")
    assert residual.channels_per_atom() == 2  # group-2 conv: channel o goes with o + 16
    assert weight_cells(residual, conv_weight(dg.model, "conv_0"), 0)[0] == [0, 16]
    g1 = group_with(dg, "conv_2")  # group 4 conv, then a channel shuffle into a group 2 conv
    cells = weight_cells(g1, conv_weight(dg.model, "conv_2"), 0)
    assert cells[0] == [k * 16 + j for k in range(4) for j in (0, 8)]
    assert g1.consumers == ["conv_3"] and not g1.blocked


GROUPED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8, 8, 8] x) => (float[N, 4, 8, 8] y) <float[16, 8, 1, 1] w1, float[16, 4, 3, 3] w2,
                                                 float[4, 16, 1, 1] w3> {
    a = Conv <kernel_shape = [1, 1]> (x, w1)
    r = Relu (a)
    b = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 4> (r, w2)
    y = Conv <kernel_shape = [1, 1]> (b, w3)
}
"""


def _grouped_model():
    proto = onnx.parser.parse_model(GROUPED)
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (16, 8, 1, 1)), ("w2", (16, 4, 3, 3)), ("w3", (4, 16, 1, 1))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return model_io.load(proto)


def test_whole_group_mode_ties_groups_in_and_out():
    dg = depgraph.build(_grouped_model(), grouped="groups")
    g = next(g for g in dg.groups if any(s.value.name == "w1" for s in g.slots))  # 1x1 + grouped conv
    names = {s.value.name for s in g.slots}
    assert {"w1", "w2", "w3", "a", "b"} <= names
    assert g.width == 4 and weight_cells(g, "w1", 0)[1] == [4, 5, 6, 7]
    within = depgraph.build(_grouped_model())
    assert max(g.width for g in within.groups if not g.blocked) == 4  # 4 positions per group of 4


def test_attention_heads_are_atoms():
    dg = graph_of("transformer")
    heads = [g for g in dg.groups if g.width == 4]
    assert len(heads) == 2
    g = heads[0]
    assert set(g.producers) == {"matmul_0", "matmul_1", "matmul_2"}  # Q, K, V projections
    assert g.consumers == ["matmul_5"]  # output projection
    q = next(n for n in dg.model.graph if n.name == "matmul_0").inputs[1].name
    assert weight_cells(g, q, 1) == [list(range(16 * h, 16 * h + 16)) for h in range(4)]
    assert g.channels_per_atom() == 16
    ffn = [g for g in dg.groups if g.width == 128]
    assert len(ffn) == 2 and all(not g.blocked for g in ffn)


def test_layernorm_residual_stream_is_a_barrier():
    dg = graph_of("transformer")
    stream = group_with(dg, "matmul_5")
    assert stream.blocked
    reasons = " ".join(str(s) for s in stream.stops)
    assert "LayerNormalization" in reasons and "graph inputs and outputs" in reasons


UNKNOWN = """
<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) <float[16, 3, 3, 3] w1, float[16, 16, 1, 1] w2,
                                                 float[4, 16, 1, 1] w3> {
    a = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
    b = Relu (a)
    c = Conv <kernel_shape = [1, 1]> (b, w2)
    d = custom.Frobnicate (c)
    y = Conv <kernel_shape = [1, 1]> (d, w3)
}
"""


def unknown_op_model():
    proto = onnx.parser.parse_model(UNKNOWN)
    rng = np.random.default_rng(1)
    for name, shape in (("w1", (16, 3, 3, 3)), ("w2", (16, 16, 1, 1)), ("w3", (4, 16, 1, 1))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return model_io.load(proto, check_support=False)


def test_unknown_op_is_a_barrier_naming_the_op():
    dg = depgraph.build(unknown_op_model())
    by_weight = {next(s.value.name for s in g.slots if s.value.name in ("w1", "w2", "w3") and s.axes == (0,)): g
                 for g in dg.groups if any(s.axes == (0,) and s.value.name in ("w1", "w2") for s in g.slots)}
    assert not by_weight["w1"].blocked  # a -> Relu -> 1x1 conv: fine
    blocked = by_weight["w2"]
    assert blocked.blocked
    stop = blocked.stops[0]
    assert stop.op_type == "Frobnicate" and "not in the channel rule table" in stop.reason
    assert stop.value == "c"


def test_reshape_segments():
    assert segments(("N", 64, 4, 4), ("N", 1024)) == [([0], [0]), ([1, 2, 3], [1])]
    assert segments(("N", 16, 64), ("N", 16, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert segments(("N", 64, 1, 1), ("N", 64)) == [([0], [0]), ([1], [1])]
    assert segments(("N", 6), ("N", 4)) is None


def test_union_find_components():
    labels = union_find(6, np.array([0, 2, 4]), np.array([1, 3, 2]))
    assert labels.tolist() == [0, 0, 2, 2, 2, 5]


@pytest.mark.parametrize("name", ["dynamic_batch", "control_flow"])
def test_shape_ops_and_control_flow_stop_with_reasons(name):
    dg = graph_of(name)
    blocked = [g for g in dg.groups if g.blocked]
    assert blocked and all(g.stops for g in blocked)
    text = " ".join(str(s) for g in blocked for s in g.stops)
    expected = {"dynamic_batch": "ConstantOfShape", "control_flow": "ReduceSum"}[name]
    assert expected in text


RESIZE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 16, 16] y) <float[16, 3, 3, 3] w1, float[4, 16, 1, 1] w2,
                                                   float[4] scales, int64[4] sizes> {
    a = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1)
    u = Resize <mode = "nearest"> (a, , SCALE_OR_SIZE)
    y = Conv <kernel_shape = [1, 1]> (u, w2)
}
"""


@pytest.mark.parametrize("by, blocked", [("scales", False), ("sizes", True)])
def test_resize_passes_channels_unless_sizes_spell_them(by, blocked):
    text = RESIZE.replace("SCALE_OR_SIZE", "scales" if by == "scales" else ", sizes")
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(2)
    inits = {"w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
             "w2": rng.standard_normal((4, 16, 1, 1)).astype(np.float32),
             "scales": np.array([1, 1, 2, 2], np.float32), "sizes": np.array([1, 16, 16, 16], np.int64)}
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in inits.items())
    dg = depgraph.build(model_io.load(proto))
    g = next(g for g in dg.groups if any(s.value.name == "w1" and s.axes == (0,) for s in g.slots))
    assert g.blocked == blocked
    assert any(s.value.name == "w2" for s in g.slots) or blocked
    if blocked:
        assert "sizes" in g.stops[0].reason


# ---------------------------------------------------------------- packed QKV attention (one projection)

PD, PH, PDH = 32, 4, 8  # model dim, heads, head dim


def packed_attention(pick: str):
    """x [N,8,32] -> x @ Wqkv [32,96] -> Reshape [0,0,3,4,8] -> Transpose [2,0,3,1,4] -> q/k/v by
    ``pick`` ("gather", "slice": Slice+Squeeze, "split": Split+Squeeze, "gather_input": Gather with a
    run-time index, "slice_step": Slice with a step, "computed_heads": head count computed from Shape,
    32 - 28, which shape inference still proves) -> softmax attention ->
    Transpose/Reshape back -> output projection -> residual Add."""
    from models.graph_builder import FLOAT, INT64, GraphBuilder

    b = GraphBuilder("packed_qkv", seed=11)
    qkv = b.linear("x", PD, 3 * PD)
    target = b.ints([0, 0, 3, PH, PDH])
    if pick == "computed_heads":
        dims = b.op("Shape", ["x"])
        heads = b.op("Sub", [b.op("Slice", [dims, b.ints([2]), b.ints([3])]), b.ints([PD - PH])])
        target = b.op("Concat", [b.ints([0, 0, 3]), heads, b.ints([PDH])], axis=0)
    t = b.op("Transpose", [b.op("Reshape", [qkv, target])], perm=[2, 0, 3, 1, 4])
    if pick == "split":
        parts = b.op("Split", [t, b.ints([1, 1, 1])], n_out=3, axis=0)
        q, k, v = (b.op("Squeeze", [p, b.ints([0])]) for p in parts)
    elif pick in ("slice", "slice_step"):
        step = 3 if pick == "slice_step" else 1  # [i:3:3] takes the same one entry as [i:i+1]
        ends = [3 if step == 3 else i + 1 for i in range(3)]
        q, k, v = (b.op("Squeeze", [b.op("Slice", [t, b.ints([i]), b.ints([ends[i]]), b.ints([0]),
                                                   b.ints([step])]), b.ints([0])]) for i in range(3))
    else:
        idx = [b.const(np.array(i, np.int64), "idx") for i in range(3)]
        if pick == "gather_input":
            idx[0] = "which"
        q, k, v = (b.op("Gather", [t, i], axis=0) for i in idx)
    scores = b.op("MatMul", [b.op("Mul", [q, b.scalar(PDH ** -0.5)]), b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    ctx = b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 2, 1, 3]), b.ints([0, 0, PD])])
    b.set_output(b.op("Add", ["x", b.linear(ctx, PD, PD)]), "y")
    inputs = [("x", FLOAT, ["N", 8, PD])] + ([("which", INT64, [])] if pick == "gather_input" else [])
    return b.model(inputs, [("y", FLOAT, ["N", 8, PD])])


def packed_heads(dg) -> depgraph.Group:
    hits = [g for g in dg.groups if "matmul_0" in g.producers]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("pick", ["gather", "slice", "split"])
def test_packed_qkv_heads_are_atoms(pick):
    dg = depgraph.build(model_io.load(packed_attention(pick)))
    g = packed_heads(dg)
    assert not g.blocked and g.width == PH
    assert g.producers == ["matmul_0"] and g.consumers == ["matmul_3"]  # qkv and output projections
    qkv_cols = [[i * PD + h * PDH + d for i in range(3) for d in range(PDH)] for h in range(PH)]
    assert weight_cells(g, "fc_w_0", 1) == qkv_cols  # head h's q, k and v columns together
    assert weight_cells(g, "fc_b_0", 0) == qkv_cols
    assert weight_cells(g, "fc_w_1", 0) == [list(range(h * PDH, (h + 1) * PDH)) for h in range(PH)]
    assert g.channels_per_atom() == PDH


@pytest.mark.parametrize("pick, reason", [
    ("gather_input", "Gather along a channel axis with computed or non-scalar indices"),
    ("slice_step", "Slice over several channel axes or with a step"),
    ("computed_heads", "computed at run time (head count)"),
])
def test_packed_qkv_variants_that_stay_barriers(pick, reason):
    dg = depgraph.build(model_io.load(packed_attention(pick)))
    g = packed_heads(dg)
    assert g.blocked and any(reason in st.reason for st in g.stops), [str(s) for s in g.stops]


@pytest.mark.parametrize("pick", ["gather", "slice", "split"])
def test_pruning_one_packed_head_equals_zeroed_out_rows(pick, ort_run, assert_close, make_feeds):
    proto = packed_attention(pick)
    model = model_io.load(proto)
    plan = plan_pruning(model, 0.25, round_to=1, min_width=1)
    key = packed_heads(depgraph.build(model)).key
    for gp in plan.groups:
        gp.remove = [1] if gp.key == key else []
    PruneChannelsPass(plan=plan)(model)
    assert checks.check_structure(model)  # topological order, checker, strict shape inference
    targets = [const_array(n.inputs[1]).tolist() for n in model.graph if n.op_type == "Reshape"]
    assert targets == [[0, 0, 3, PH - 1, PDH], [0, 0, PD - PDH]]  # head count rewritten
    assert const_array(model.graph.initializers["fc_w_0"]).shape == (PD, 3 * (PD - PDH))
    reference = onnx.load_from_string(proto.SerializeToString())
    wo = next(t for t in reference.graph.initializer if t.name == "fc_w_1")
    arr = onnx.numpy_helper.to_array(wo).copy()
    arr[PDH: 2 * PDH] = 0  # head 1's rows of the output projection
    wo.CopyFrom(onnx.numpy_helper.from_array(arr, "fc_w_1"))
    for batch in (1, 3):
        feed = make_feeds(proto, batch=batch, n=1)[0]
        assert_close(ort_run(model, feed), ort_run(reference, feed), rtol=1e-4, atol=1e-5)


def test_heads_step_by_whole_heads_under_the_conv_block(tmp_path):
    # 8-channel heads, rounding to 32 channels: no conv touches the heads, so the planner steps one head
    # at a time (a step of 32 channels would have been all 4 heads: the group was "too narrow").
    model = model_io.load(packed_attention("gather"))
    plan = plan_pruning(model, 0.5, round_to=32)
    gp = next(g for g in plan.groups if "matmul_0" in g.producers)
    assert not gp.conv and gp.status == "pruned" and len(gp.remove) == PH // 2
    conv = next(g for g in plan_pruning(model_io.load(conv_heads_model()), 0.5, round_to=16).groups
                if g.channels_per_atom > 1)
    assert conv.conv and conv.status == "pruned" and conv.kept_channels % 16 == 0  # the conv block holds


def conv_heads_model():
    """A grouped 1x1 conv with 4 groups of 8 channels between two plain convs: its atoms are 8 channels
    wide and a conv reads them, so kept channels stay a multiple of the block."""
    from models.graph_builder import FLOAT, GraphBuilder

    b = GraphBuilder("grouped", seed=3)
    h = b.conv("x", 8, 32, k=1)
    h = b.conv(h, 32, 32, k=1, group=4)
    b.set_output(b.conv(h, 32, 8, k=1), "y")
    return b.model([("x", FLOAT, ["N", 8, 4, 4])], [("y", FLOAT, ["N", 8, 4, 4])])
