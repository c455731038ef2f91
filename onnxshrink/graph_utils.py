"""Small graph-editing helpers shared by the passes. Tensors are identified by object, never by name."""

from __future__ import annotations

import copy as _copy
import gc
import itertools
import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")


def own_type(value: ir.Value):
    """A copy of ``value``'s type object (None stays None), for a value that takes another's type:
    sharing the object would let ``x.dtype = ...`` on one retype the other."""
    return None if value.type is None else _copy.deepcopy(value.type)


def clone_model(model: ir.Model) -> ir.Model:
    """``model.clone()`` with every value's type its own object. onnx_ir's clone shares the type
    objects of the values it copies, and ``value.dtype = x`` changes the type object in place, so a
    pass or an inference run on a plain clone could retype the original (found when a MACs count on a
    folded copy retyped PP-OCR rec's Slice output in the model being optimized). The model's ``meta``
    is copied too."""
    copy = model.clone()
    copy.meta.update(model.meta)  # what load recorded (model_io.KEEP_EXTERNAL)
    for graph in [*copy.graphs(), *(f.graph for f in copy.functions.values())]:
        for v in [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)]:
            v.type = own_type(v)
    return copy


def release_models() -> None:
    """Free the models a search has dropped, now. An ``onnx_ir`` graph is a web of reference cycles
    (nodes and values point at each other) that outlives its ``Model`` object until Python's cyclic
    collector runs, and a loop that builds few Python objects but large arrays may not trigger a full
    collection for a long time: quantizing a 2.25 GiB model kept the graphs of the calibration
    candidates it had dropped (0.6 GB of int8 weights each), 7.25 GB anonymous at the peak against
    4.36 GB with this (one-off measurements). Call after dropping the last reference to a candidate."""
    gc.collect()


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in DEFAULT_DOMAINS


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant content of ``value`` (a non-overridable initializer or a Constant node's output)."""
    if value is None:
        return None
    if value.is_graph_input():
        return None  # an initializer listed as input can be overridden at run time
    if value.const_value is not None:
        try:
            return value.const_value.numpy()
        except Exception:  # noqa: BLE001 - unsupported dtype (strings of odd kinds, packed types)
            return None
    node = value.producer()
    if node is not None and node.op_type == "Constant" and is_default_domain(node):
        return _constant_node_array(node)
    return None


def const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of ``value``'s constant content, where :func:`const_array` would find one, without
    reading the data (a weight sliced lazily by pruning would otherwise be computed again)."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return tuple(int(d) for d in value.const_value.shape)
    node = value.producer()
    if node is not None and node.op_type == "Constant" and is_default_domain(node):
        arr = _constant_node_array(node)
        return None if arr is None else arr.shape
    return None


def _constant_node_array(node: ir.Node) -> np.ndarray | None:
    attrs = node.attributes
    if "value" in attrs:
        return attrs["value"].as_tensor().numpy()
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key].value, dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key].value), dtype=dtype)
    return None


def attr_value(node: ir.Node, name: str, default=None):
    """``node``'s attribute ``name`` as a Python value (int, float, list, ...), or ``default``."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def int_attr(node: ir.Node, name: str, default: int) -> int:
    """``node``'s integer attribute ``name``, or ``default`` when it has none."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def float_attr(node: ir.Node, name: str, default: float) -> float:
    """``node``'s float attribute ``name``, or ``default`` when it has none."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def is_constant(value: ir.Value | None) -> bool:
    """Whether ``value`` is a constant :func:`const_array` may read, judged from metadata alone (no
    tensor is loaded; an unreadable dtype still counts as constant)."""
    if value is None or value.is_graph_input():
        return False
    if value.const_value is not None:
        return True
    node = value.producer()
    return node is not None and node.op_type == "Constant" and is_default_domain(node)


def scalar_value(value: ir.Value | None) -> float | None:
    """The single value of a constant whose elements are all equal, else None."""
    arr = const_array(value)
    if arr is None or arr.size == 0 or arr.dtype.kind not in "biuf":
        return None
    first = arr.flat[0]
    if arr.size > 1 and not np.all(arr == first):
        return None
    return float(first)


class NameGen:
    """Unique value names for one model: scans names once, then hands out fresh ones."""

    def __init__(self, model_or_graph) -> None:
        self.taken: set[str] = set()
        self._next: dict[str, int] = {}
        graphs = model_or_graph.graphs() if isinstance(model_or_graph, ir.Model) else [model_or_graph]
        for g in graphs:
            for v in itertools.chain(g.inputs, g.outputs, g.initializers.values()):
                if v.name:
                    self.taken.add(v.name)
            for node in g:
                for v in node.outputs:
                    if v.name:
                        self.taken.add(v.name)
                if node.name:
                    self.taken.add(node.name)

    def __call__(self, hint: str) -> str:
        # Probing resumes where it stopped for this hint: many names from one hint stay linear.
        i = self._next.get(hint, 0)
        name = hint if i == 0 else f"{hint}_{i}"
        while name in self.taken:
            i += 1
            name = f"{hint}_{i}"
        self._next[hint] = i + 1
        self.taken.add(name)
        return name


def rename_changed(values, names: NameGen, tag: str) -> None:
    """Give ``values``, which a rewrite made hold other numbers than before (a tensor rescaled by
    equalization, SmoothQuant or a folded scale), fresh names ``<name>_<tag>``: a name the rewritten model
    shares with its input then always means the same values (``explain`` maps tensors by name). Graph
    outputs keep theirs: the interface never changes."""
    for v in dict.fromkeys(values):
        if v is not None and v.name and not v.is_graph_output():
            v.name = names(f"{v.name}_{tag}")


def add_initializer(graph, array: np.ndarray, name: str) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` (a Function gets a Constant node instead)."""
    array = np.require(array, requirements="C")
    # ``ir.Tensor`` directly for plain numeric arrays: ``ir.tensor``'s protocol checks cost 9x more (46 vs
    # 5 us, one-off), a tenth of quantizing a 900-node chain, which adds thousands of scales and codes
    tensor = ir.Tensor(array, name=name) if array.dtype.kind in "biuf" else ir.tensor(array, name=name)
    if isinstance(graph, ir.Graph):
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        graph.register_initializer(value)
        return value
    node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", tensor)], name=name)
    out = node.outputs[0]
    out.name = name
    out.shape = ir.Shape(array.shape)
    out.type = ir.TensorType(tensor.dtype)
    out.const_value = tensor
    graph.insert_before(graph[0], node) if len(graph) else graph.append(node)
    return out


def owning_graph(node: ir.Node):
    return node.graph


def bypass(node: ir.Node, old: ir.Value, new: ir.Value) -> str | None:
    """Make every user of ``old`` (produced by ``node``) read ``new`` instead, then drop ``node``.

    Handles ``old`` being a graph output: ``new`` takes over the output's name, type and shape, so the
    graph's interface never changes. Returns None on success, or the reason it could not.
    """
    graph = node.graph
    if graph is None:
        return "node is not attached to a graph"
    if old.is_graph_output():
        if new.is_graph_input() or new.is_initializer() or new.is_graph_output():
            return "its output is a graph output and its input is a graph input, initializer or output"
        if new.graph is not graph:
            return "its output is a graph output fed from an outer scope"
        if new.producer() is None:
            return "its output is a graph output and its input has no producer"
        outputs = graph.outputs
        name, shape, dtype = old.name, old.shape, old.dtype
        for i, out in enumerate(outputs):
            if out is old:
                outputs[i] = new
        old.name = None
        new.name = name
        if shape is not None:
            new.shape = shape
        if dtype is not None:
            new.dtype = dtype
    old.replace_all_uses_with(new)
    graph.remove(node, safe=True)
    return None


def subgraphs_of(node: ir.Node) -> list:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    subs: list = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            subs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            subs.extend(attr.value)
    return subs


def drop_node(node: ir.Node, *, safe: bool = True) -> None:
    """Remove an unused node, first detaching the nodes of its subgraphs from outer-scope values
    (otherwise those outer values would still look used)."""
    for sub in subgraphs_of(node):
        for inner in reversed(list(sub)):
            drop_node(inner, safe=False)
    node.graph.remove(node, safe=safe)


def iter_nodes_safe(graph):
    """Snapshot of a graph's nodes, so passes may remove nodes while iterating."""
    return list(graph)


#: Default-domain ops whose output is a sequence / an optional, and that type's class: onnx_ir's
#: ShapeInferencePass (1.1) records their inferred element type as a plain tensor type, which ONNX
#: Runtime refuses.
_CONTAINER_OUTPUTS = {
    **dict.fromkeys(("SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SplitToSequence"),
                    ir.SequenceType),
    "Optional": ir.OptionalType,
}


def infer_shapes(model: ir.Model, *, data_prop: bool = False) -> None:
    """onnx shape inference into ``model`` (in place, non-strict), keeping sequence and optional outputs
    sequence and optional: the pass retyped them as tensors."""
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=data_prop)(model)
    for node in model.graph.all_nodes():
        kind = _CONTAINER_OUTPUTS.get(node.op_type) if is_default_domain(node) else None
        if kind is not None and node.outputs and isinstance(node.outputs[0].type, ir.TensorType):
            out = node.outputs[0]
            out.type, out.shape = kind(out.type), None
