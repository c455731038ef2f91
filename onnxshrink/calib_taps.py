"""Calibration taps: the tensors to observe, the tap model that outputs them, and its session.

``plan_taps`` clones the model (``ir.Model.clone`` shares every tensor, so no weight is copied), maps the
caller's values onto the clone by walking both graphs in step (values are matched by position, never by
name), and makes each tapped value an output of the clone's main graph. The model's own outputs stay only
as ``TapPlan.checks`` (the runner checks batching with them). A tap is found again through
``TapPlan.taps`` (its index in the session outputs), never by its output name.

Where a tapped value lives:

- main graph: it becomes a graph output; a main-graph input is read from the feed instead.
- inside ``If`` branches and ``Loop``/``Scan`` bodies: it is *lifted*. ONNX Runtime cannot return a value
  of a subgraph, so an ``Identity`` of it becomes a new output of its subgraph and of the node owning that
  subgraph, level by level up to the main graph. ``If``: the other branch returns an empty tensor (shape
  ``[0] * rank``, same dtype), so a run through the untaken branch has nothing to observe and a branch never
  taken leaves the value unobserved. ``Loop``/``Scan``: the value becomes an extra scan output, so the main
  graph sees every iteration stacked on a new leading axis (``Tap.extra_axes`` counts such axes; a channel
  axis 1 becomes ``1 + extra_axes``). A loop value whose shape changes between iterations cannot be stacked:
  ONNX Runtime then fails the run (``plan_taps(lift_loops=False)`` leaves loop bodies out).
- inside model-local functions or subgraphs of other ops: not tappable. The default selection skips them
  (``TapPlan.skipped`` says why) and naming one is a ``ConfigError``.

With ``reduce=True`` (min/max observers) each tap outputs four scalars reduced inside the graph instead of
the tensor (``calib_reduce``), so a run returns a few numbers per tensor rather than every activation.

Ranges of tapped values are keyed by the value's own name, so a quantizer finds the range of a value inside
a subgraph under that value's name.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxshrink import model_io, runtime
from onnxshrink.calib_reduce import ReduceBuilder
from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import NameGen, clone_model, subgraphs_of
from onnxshrink.observers import OUTLIER_ABS

logger = logging.getLogger(__name__)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
LIFTABLE_OPS = ("If", "Loop", "Scan")
ORT_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


@dataclasses.dataclass(frozen=True)
class Tap:
    """One observed tensor and where its data comes from: ``feed`` (a graph input name, read from the
    feed), ``output`` (session output index of the whole tensor) or ``stats`` (session output indices
    of min, max, outliers and size reduced in the graph, see ``calib_reduce``); ``channel_sum``: output
    index of in-graph per-channel sums. ``extra_axes`` leading axes were added by lifting out of loops."""

    name: str
    feed: str | None = None
    output: int | None = None
    stats: tuple[int, int, int, int] | None = None
    channel_sum: int | None = None
    extra_axes: int = 0


@dataclasses.dataclass
class TapPlan:
    taps: list[Tap]
    model: ir.Model | None  # the tap model; None when every tap is a graph input
    skipped: dict[str, str]  # default selection: value name -> why it was left out
    checks: list[int] = dataclasses.field(default_factory=list)  # outputs of the model's own outputs

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.taps]


def plan_taps(model: ir.Model, tensors: Sequence[ir.Value | str] | None = None, *,
              lift_loops: bool = True, reduce: bool = False, outlier_abs: float = OUTLIER_ABS,
              channel_means: Sequence[str] = (), trim: bool = False) -> TapPlan:
    """Build the tap model of ``model`` for ``tensors`` (default: every float tensor that is an input or
    output of a node, initializers and constants excepted). ``reduce``: output in-graph extremes instead
    of whole tensors (``calib_reduce``); ``channel_means``: tap names whose per-channel sums are reduced in
    the graph too. ``trim``: leave out the model's own outputs (no batching checks) and every node the
    taps do not need, so tapping an early layer runs only the layers before it (ONNX Runtime runs every
    node of a session, whatever outputs a run asks for). ``model`` itself is never modified."""
    clone = clone_model(model)
    mapping: dict[ir.Value, ir.Value] = {}
    _pair_graphs(model.graph, clone.graph, mapping)
    if tensors is None or not all(isinstance(t, ir.Value) and t.dtype is not None and t.shape is not None
                                  for t in tensors):
        _infer_types(clone)  # explicit values that carry their types need no inference
    owners = {sub: node for g in clone.graphs() for node in g for sub in subgraphs_of(node)}
    skipped: dict[str, str] = {}
    if tensors is None:
        chosen = _default_values(clone, owners, skipped, lift_loops)
    else:
        chosen = [_resolve(item, clone, mapping, owners, lift_loops) for item in tensors]
        dupes = {v.name for v in chosen if chosen.count(v) > 1}
        if dupes:
            raise ConfigError(f"calibration tensors listed twice: {sorted(dupes)}")
    unknown = sorted(set(channel_means) - {v.name for v in chosen})
    if unknown:
        raise ConfigError(f"channel_means names tensors that are not calibrated: {unknown}")
    fresh = _fresh_names(clone)
    builder = ReduceBuilder(clone.graph, model_io.default_opset(clone) or 1, outlier_abs, fresh)
    taps: list[Tap] = []
    outputs: list[ir.Value] = []
    for value in chosen:
        if value.graph is clone.graph and value.is_graph_input():
            taps.append(Tap(value.name, feed=value.name))
            continue
        lifted, extra = _lift(value, clone.graph, owners, fresh)
        taps.append(_output_tap(value, lifted, extra, outputs, builder if reduce else None,
                                value.name in channel_means))
    checks = _check_outputs(clone.graph, outputs) if outputs and not trim else []
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(outputs)
    if trim and outputs:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(clone)
    if skipped:
        logger.info("calibration: %d tensors left out of the default selection", len(skipped))
    return TapPlan(taps, clone if outputs else None, skipped, checks)


def _fresh_names(model: ir.Model):
    """``fresh(hint)``: a new value/node name; a counter in the hint keeps each lookup O(1)."""
    names, counter = NameGen(model), itertools.count()
    return lambda hint: names(f"{hint}_{next(counter)}")


def _check_outputs(graph: ir.Graph, outputs: list) -> list[int]:
    """Indices in ``outputs`` of the model's own outputs (appended when not tapped whole), with which
    the runner checks that stacking feeds on axis 0 leaves each feed's results unchanged."""
    checks = []
    for v in graph.outputs:
        if v.const_value is not None or v.is_graph_input():
            continue
        if v not in outputs:
            outputs.append(v)
        checks.append(outputs.index(v))
    return checks


def _output_tap(value, lifted, extra: int, outputs: list, builder, want_mean: bool) -> Tap:
    """Add the outputs carrying ``lifted`` (the whole tensor, or in-graph reductions) to ``outputs``."""
    rank = len(value.shape) + extra if value.shape is not None else None
    if builder is None or (want_mean and rank is None):
        outputs.append(lifted)
        return Tap(value.name, output=len(outputs) - 1, extra_axes=extra)
    start = len(outputs)
    outputs.extend(builder.stats(lifted))
    stats = (start, start + 1, start + 2, start + 3)
    channel_sum = None
    if want_mean:
        outputs.append(builder.channel_sum(lifted, rank, 1 + extra))
        channel_sum = len(outputs) - 1
    return Tap(value.name, stats=stats, channel_sum=channel_sum, extra_axes=extra)


def _pair_graphs(g1: ir.Graph, g2: ir.Graph, out: dict) -> None:
    """Map every value of ``g1`` (and its subgraphs) to its twin in the structural copy ``g2``."""
    nodes1, nodes2 = list(g1), list(g2)
    if len(nodes1) != len(nodes2) or len(g1.inputs) != len(g2.inputs):
        raise RuntimeError("the model clone does not match the model")  # a bug, not a user error
    out.update(zip(g1.inputs, g2.inputs))
    out.update(zip(g1.initializers.values(), g2.initializers.values()))
    for n1, n2 in zip(nodes1, nodes2):
        out.update(zip(n1.outputs, n2.outputs))
        for s1, s2 in zip(subgraphs_of(n1), subgraphs_of(n2)):
            _pair_graphs(s1, s2, out)


def _infer_types(model: ir.Model) -> None:
    """Fill in missing dtypes/shapes with onnx shape inference (large initializers lifted out)."""
    from onnxshrink.graph_utils import infer_shapes

    infer_shapes(model)


def _why_not(value: ir.Value, owners: dict, main: ir.Graph, lift_loops: bool) -> str | None:
    """Why ``value`` cannot be tapped, or None."""
    if not value.name:
        return "the value has no name"
    if value.const_value is not None or value.is_initializer():
        return "it is an initializer (a constant)"
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        return "it is the output of a Constant node"
    if value.dtype is not None and value.dtype not in FLOAT_TYPES:
        return f"its dtype {value.dtype} is not float"
    graph = value.graph
    while graph is not main:
        node = owners.get(graph)
        if node is None:
            return "it is inside a function or a detached graph"
        if node.op_type not in LIFTABLE_OPS or node.domain not in ("", "ai.onnx"):
            return f"it is inside a subgraph of {node.op_type} node {node.name!r}"
        if not lift_loops and node.op_type != "If":
            return f"it is inside the body of {node.op_type} node {node.name!r} (loop lifting is off)"
        graph = node.graph
    return None


def _default_values(clone, owners, skipped: dict, lift_loops: bool) -> list[ir.Value]:
    chosen: dict[ir.Value, None] = {}
    names: dict[str, ir.Value] = {}
    for graph in clone.graphs():
        for node in graph:
            for v in (*node.inputs, *node.outputs):
                if v is None or v in chosen or v.dtype not in FLOAT_TYPES:
                    continue
                reason = _why_not(v, owners, clone.graph, lift_loops)
                if reason is None and v.name in names and names[v.name] is not v:
                    reason = "another value has the same name"
                if reason is not None:
                    skipped.setdefault(v.name or "<unnamed>", reason)
                    continue
                names[v.name] = v
                chosen[v] = None
    return list(chosen)


def _resolve(item, clone, mapping, owners, lift_loops: bool) -> ir.Value:
    if isinstance(item, ir.Value):
        value = mapping.get(item)
        if value is None:
            raise ConfigError(f"calibration tensor {item.name!r} is not a value of this model's graphs")
    elif isinstance(item, str):
        found = [v for g in clone.graphs() for v in _graph_values(g) if v.name == item]
        if not found:
            known = sorted({v.name for g in clone.graphs() for v in _graph_values(g) if v.name})
            close = difflib.get_close_matches(item, known, n=3)
            raise ConfigError(f"no tensor named {item!r} in the model" + (f"; did you mean {close}?" if close else ""))
        if len({id(v) for v in found}) > 1:
            raise ConfigError(f"{len(found)} different tensors are named {item!r}; pass the ir.Value instead")
        value = found[0]
    else:
        raise ConfigError(f"calibration tensors are ir.Value or names, got a {type(item).__name__}")
    reason = _why_not(value, owners, clone.graph, lift_loops)
    if reason is not None:
        raise ConfigError(f"cannot calibrate tensor {value.name!r}: {reason}")
    return value


def _graph_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _lift(value: ir.Value, main: ir.Graph, owners: dict, fresh) -> tuple[ir.Value, int]:
    """A main-graph value carrying ``value`` (see the module docstring), and the loop axes added."""
    extra = 0
    while value.graph is not main:
        graph = value.graph
        node = owners[graph]
        ident = ir.Node("", "Identity", [value], name=fresh("calib_tap"))
        graph.append(ident)
        inner = ident.outputs[0]
        inner.name, inner.dtype, inner.shape = fresh(f"{value.name}_tap"), value.dtype, value.shape
        graph.outputs.append(inner)
        if node.op_type == "If":
            _add_empty_output(_other_branch(node, graph), value, fresh)
        else:  # Loop or Scan: an extra scan output, stacked over iterations
            extra += 1
            for key in ("scan_output_axes", "scan_output_directions"):
                if key in node.attributes:
                    node.attributes[key] = ir.AttrInt64s(key, [*node.attributes[key].value, 0])
        node.resize_outputs(len(node.outputs) + 1)
        lifted = node.outputs[-1]
        lifted.name, lifted.dtype = fresh(f"{value.name}_tap"), value.dtype
        value = lifted
    return value, extra


def _other_branch(node: ir.Node, graph: ir.Graph) -> ir.Graph:
    then_g = node.attributes["then_branch"].value
    return node.attributes["else_branch"].value if then_g is graph else then_g


def _add_empty_output(branch: ir.Graph, like: ir.Value, fresh) -> None:
    rank = len(like.shape) if like.shape is not None else 1
    empty = ir.tensor(np.zeros([0] * rank, dtype=like.dtype.numpy()))
    const = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", empty)], name=fresh("calib_tap"))
    branch.append(const)
    out = const.outputs[0]
    out.name, out.dtype, out.shape = fresh(f"{like.name}_tap_empty"), like.dtype, ir.Shape([0] * rank)
    branch.outputs.append(out)


def open_session(plan: TapPlan, providers=None):
    """One ONNX Runtime session of the tap model at ``ORT_ENABLE_BASIC``.

    Basic optimizations (constant folding, redundant-node removal) keep every value the graph defines;
    extended/layout optimizations would fuse nodes and convert layouts around each tapped output (blocked
    fusions, extra reorders) for no gain. The priority-based execution order runs each in-graph reduction
    right after the tensor it reduces (the default order left every activation of a PP-OCR detector alive
    to the end: 550 MB peak instead of 230 MB). The small tap graph goes to ONNX Runtime as bytes: external
    weights are referenced in place (the weights' folder is given as the external-data folder, the same as
    saving the graph next to them); only models whose external data spans several folders, or whose
    in-memory weights are too big for one protobuf, are written to a temporary folder.
    """
    rt = runtime.ort()
    model = plan.model
    so = runtime.session_options(level=rt.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    so.execution_order = rt.ExecutionOrder.PRIORITY_BASED  # runs in-graph reductions early (see below)
    session = runtime.make_session(model, providers, options=so)  # external data stays referenced
    _check_output_types(session, plan)
    return session


def _check_output_types(session, plan: TapPlan) -> None:
    types = [o.type for o in session.get_outputs()]
    for tap in plan.taps:
        index = tap.output if tap.output is not None else (tap.stats[0] if tap.stats else None)
        if index is not None and types[index] not in ORT_FLOAT_TYPES:
            raise ConfigError(f"cannot calibrate tensor {tap.name!r}: ONNX Runtime says it is {types[index]}")
