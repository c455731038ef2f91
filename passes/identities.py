"""``eliminate_identities``: bypass nodes that provably return their input unchanged.

Rules, one ``_try_<rule>`` each (the stats key in brackets). Only default-domain nodes are touched.

1. ``Identity(x)`` -> x [identity_removed].
2. ``Dropout(x)`` in inference mode: no ``training_mode`` input or a constant false one (opset < 7:
   ``is_test`` not 0); refused while the mask output is used [dropout_removed].
3. ``Cast(x, to=T)`` with x already of type T; ``CastLike(x, y)`` with x and y of one type [cast_removed].
4. ``Reshape(x, s)`` / ``Flatten(x)`` whose output shape provably equals x's: s constant, each entry
   equal to x's static dim, 0 (copy, without ``allowzero``) or a single -1 [reshape_removed].
5. ``Transpose(x)`` with the identity perm [transpose_removed].
6. ``Expand(x, s)`` where broadcasting s onto x's shape gives x's shape [expand_removed].
7. ``Pad(x)`` with all pads 0, any mode [pad_removed].
8. ``Mul``/``Div`` by 1, ``Add`` of 0, ``x - 0`` (never ``0 - x``), when the constant has x's dtype and
   broadcasts to nothing larger than x's shape [neutral_removed].
9. ``Squeeze(Unsqueeze(x, a), a)`` and ``Unsqueeze(Squeeze(x, a), a)`` -> x [squeeze_pairs_removed].
10. ``Transpose(Transpose(x, p1), p2)`` -> ``Transpose(x, p1[p2])``, or x when that is the identity; the
    inner output must have no other user unless the result is x [transposes_merged].
11. ``Reshape(R(x), s)`` with R a Reshape/Flatten/Squeeze/Unsqueeze used only here -> ``Reshape(x, s)``.
    s must be constant (or ``allowzero=1``); its 0 entries copy the intermediate's dims, so they are
    replaced by its static dims, or the rule refuses [reshapes_merged].
12. ``Slice`` taking the whole tensor: steps 1, starts 0, ends at or past the dim (or >= 2**31-1 when the
    dim is unknown) [slice_removed].
13. ``Concat`` of one input [concat_removed]; ``Split`` into one output [split_removed].

Runs in every graph, subgraph and function. Bypassing keeps graph outputs' names, types and shapes
(``graph_utils.bypass``); a node whose removal would need a graph output to become a graph input,
an initializer or an outer-scope value is kept and reported with ``stats.skip``. Missing dtypes and
shapes are first filled in by onnx shape inference (``infer_shapes`` option).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxshrink.passes import _shape_info

from onnxshrink.graph_utils import (
    NameGen,
    add_initializer,
    bypass,
    const_array,
    drop_node,
    is_default_domain,
    scalar_value,
)
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass, iter_graphs

logger = logging.getLogger(__name__)

#: An end index at least this large is taken to mean "to the end" when the dim is unknown.
_SLICE_END_ALL = 2**31 - 1
_RESHAPE_LIKE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
#: op -> (neutral element, whether the constant may be either operand)
_NEUTRAL = {"Add": (0.0, True), "Mul": (1.0, True), "Sub": (0.0, False), "Div": (1.0, False)}


# ---------------------------------------------------------------- small helpers


def _ints(value: ir.Value | None) -> list[int] | None:
    arr = const_array(value)
    if arr is None or arr.dtype.kind not in "iu" or arr.ndim > 1:
        return None
    return [int(v) for v in arr.reshape(-1)]


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def _axes(node: ir.Node) -> list[int] | None:
    """The ``axes`` of a Squeeze/Unsqueeze/Slice: attribute (old opsets) or constant input 1."""
    if "axes" in node.attributes:
        return _attr_ints(node, "axes")
    return _ints(node.inputs[1]) if len(node.inputs) > 1 else None


def _dims(value: ir.Value | None) -> list | None:
    return None if value is None or value.shape is None else list(value.shape)


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _broadcast_keeps(x_dims: list | None, c_shape) -> bool:
    """Whether broadcasting a tensor of shape ``c_shape`` onto ``x_dims`` leaves ``x_dims`` unchanged."""
    if x_dims is None or len(c_shape) > len(x_dims):
        return False
    aligned = x_dims[len(x_dims) - len(c_shape):]
    return all(c == 1 or _same_dim(x, c) for x, c in zip(aligned, c_shape))


def _reshape_keeps(x_dims: list | None, target: list[int], allowzero: bool) -> bool:
    if x_dims is None or len(target) != len(x_dims):
        return False
    free = [i for i, t in enumerate(target) if t == -1]
    if len(free) > 1 or any(d == 0 for d in x_dims):
        return False  # a -1 next to an empty dim is ambiguous
    return all(
        i in free or (t == 0 and not allowzero) or (isinstance(d, int) and d == t)
        for i, (d, t) in enumerate(zip(x_dims, target))
    )


def _const_dtype(value: ir.Value, arr: np.ndarray) -> ir.DataType | None:
    if value.dtype is not None:
        return value.dtype
    try:
        return ir.DataType.from_numpy(arr.dtype)
    except Exception:  # noqa: BLE001 - dtypes onnx has no name for
        return None


def _perm(node: ir.Node, rank: int | None) -> list[int] | None:
    perm = _attr_ints(node, "perm")
    if perm is None and rank is not None:
        perm = list(reversed(range(rank)))
    return perm


def _producer(node: ir.Node, op_types) -> ir.Node | None:
    x = node.inputs[0] if node.inputs else None
    first = None if x is None else x.producer()
    if first is None or first.op_type not in op_types or not is_default_domain(first):
        return None
    return first


def _only_feeds(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(u.node is node for u in value.uses())


def _unused(node: ir.Node) -> bool:
    return all(not v.uses() and not v.is_graph_output() for v in node.outputs)


# ---------------------------------------------------------------- the rules


class _Eliminator:
    """Applies the rules to the nodes of one graph-like container."""

    def __init__(self, stats: PassStats, names: NameGen) -> None:
        self.stats = stats
        self.names = names
        self.container = None
        self.rules = {
            "Identity": (self._try_identity,), "Dropout": (self._try_dropout,),
            "Cast": (self._try_cast,), "CastLike": (self._try_castlike,),
            "Reshape": (self._try_reshape, self._try_reshape_pair), "Flatten": (self._try_flatten,),
            "Transpose": (self._try_transpose, self._try_transpose_pair),
            "Expand": (self._try_expand,), "Pad": (self._try_pad,),
            "Squeeze": (self._try_squeeze_pair,), "Unsqueeze": (self._try_squeeze_pair,),
            "Slice": (self._try_slice,), "Concat": (self._try_concat,), "Split": (self._try_split,),
            **{op: (self._try_neutral,) for op in _NEUTRAL},
        }

    def run(self, container) -> None:
        self.container = container
        for node in list(container):
            rules = self.rules.get(node.op_type) if is_default_domain(node) else None
            # A merge keeps the node and may enable another merge or removal: repeat until nothing
            # fires. Every firing removes a node, so this ends; the cap only guards against bugs.
            for _ in range(1000):
                if not rules or node.graph is None or not any(rule(node) for rule in rules):
                    break

    def _bypass(self, node: ir.Node, new: ir.Value | None, key: str, first: ir.Node | None = None) -> bool:
        if new is None:
            return False
        reason = bypass(node, node.outputs[0], new)
        if reason:
            self.stats.skip(node, reason)
            return False
        self.stats.add(key)
        if first is not None and first.graph is not None and _unused(first):
            drop_node(first)
        return True

    def _try_identity(self, node: ir.Node) -> bool:
        return self._bypass(node, node.inputs[0], "identity_removed")

    def _try_dropout(self, node: ir.Node) -> bool:
        if node.attributes.get_int("is_test", 1) == 0:
            return False
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if training is not None:
            flag = const_array(training)
            if flag is None:
                self.stats.skip(node, "training_mode is not a constant")
                return False
            if flag.any():
                return False
        if len(node.outputs) > 1 and not _unused_value(node.outputs[1]):
            self.stats.skip(node, "its mask output is used")
            return False
        return self._bypass(node, node.inputs[0], "dropout_removed")

    def _try_cast(self, node: ir.Node) -> bool:
        x, to = node.inputs[0], node.attributes.get_int("to")
        if x is None or x.dtype is None or to is None or x.dtype != ir.DataType(to):
            return False
        return self._bypass(node, x, "cast_removed")

    def _try_castlike(self, node: ir.Node) -> bool:
        x, like = node.inputs[0], node.inputs[1]
        if x is None or like is None or x.dtype is None or x.dtype != like.dtype:
            return False
        return self._bypass(node, x, "cast_removed")

    def _try_reshape(self, node: ir.Node) -> bool:
        target = _ints(node.inputs[1]) if len(node.inputs) > 1 else _attr_ints(node, "shape")
        allowzero = bool(node.attributes.get_int("allowzero", 0))
        if target is None or not _reshape_keeps(_dims(node.inputs[0]), target, allowzero):
            return False
        return self._bypass(node, node.inputs[0], "reshape_removed")

    def _try_flatten(self, node: ir.Node) -> bool:
        dims = _dims(node.inputs[0])
        if dims is None or len(dims) != 2:
            return False
        axis = node.attributes.get_int("axis", 1)
        axis = axis + 2 if axis < 0 else axis
        if not (axis == 1 or (axis == 0 and dims[0] == 1) or (axis == 2 and dims[1] == 1)):
            return False
        return self._bypass(node, node.inputs[0], "reshape_removed")

    def _try_transpose(self, node: ir.Node) -> bool:
        dims = _dims(node.inputs[0])
        perm = _perm(node, None if dims is None else len(dims))
        if perm is None or perm != list(range(len(perm))):
            return False
        return self._bypass(node, node.inputs[0], "transpose_removed")

    def _try_expand(self, node: ir.Node) -> bool:
        shape = _ints(node.inputs[1])
        if shape is None or not _broadcast_keeps(_dims(node.inputs[0]), shape):
            return False
        return self._bypass(node, node.inputs[0], "expand_removed")

    def _try_pad(self, node: ir.Node) -> bool:
        if "pads" in node.attributes or "paddings" in node.attributes:
            pads = _attr_ints(node, "pads" if "pads" in node.attributes else "paddings")
        else:
            pads = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None or any(pads):
            return False
        return self._bypass(node, node.inputs[0], "pad_removed")

    def _try_neutral(self, node: ir.Node) -> bool:
        neutral, either_side = _NEUTRAL[node.op_type]
        for ci in (1, 0) if either_side else (1,):
            c, x = node.inputs[ci], node.inputs[1 - ci]
            if x is None or scalar_value(c) != neutral:
                continue
            arr = const_array(c)
            if x.dtype is None or x.shape is None:
                self.stats.skip(node, "the other operand's dtype or shape is unknown")
                continue
            if x.dtype == _const_dtype(c, arr) and _broadcast_keeps(_dims(x), arr.shape):
                return self._bypass(node, x, "neutral_removed")
        return False

    def _try_squeeze_pair(self, node: ir.Node) -> bool:
        other = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
        first = _producer(node, (other,))
        if first is None:
            return False
        a1, a2, x = _axes(first), _axes(node), first.inputs[0]
        if not a1 or not a2:
            return False
        if min(a1 + a2) < 0:  # both axes lists index the rank of the unsqueezed tensor
            dims = _dims(x)
            if dims is None:
                return False
            rank = len(dims) + (len(a1) if other == "Unsqueeze" else 0)
            a1, a2 = [a % rank for a in a1], [a % rank for a in a2]
        if sorted(a1) != sorted(a2):
            return False
        return self._bypass(node, x, "squeeze_pairs_removed", first)

    def _try_transpose_pair(self, node: ir.Node) -> bool:
        first = _producer(node, ("Transpose",))
        if first is None:
            return False
        x = first.inputs[0]
        rank = None if _dims(x) is None else len(_dims(x))
        p1, p2 = _perm(first, rank), _perm(node, rank)
        if p1 is None or p2 is None or len(p1) != len(p2):
            return False
        perm = [p1[j] for j in p2]
        if perm == list(range(len(perm))):
            return self._bypass(node, x, "transposes_merged", first)
        if not _only_feeds(node.inputs[0], node):
            return False
        node.replace_input_with(0, x)
        node.attributes["perm"] = ir.AttrInt64s("perm", perm)
        drop_node(first)
        self.stats.add("transposes_merged")
        return True

    def _try_reshape_pair(self, node: ir.Node) -> bool:
        first = _producer(node, _RESHAPE_LIKE)
        if first is None or len(node.inputs) < 2 or not _only_feeds(node.inputs[0], node):
            return False
        allowzero = bool(node.attributes.get_int("allowzero", 0))
        target = _ints(node.inputs[1])
        if not allowzero and (target is None or 0 in target):
            if target is None:
                return False
            mid = _dims(node.inputs[0])
            copied = [i for i, t in enumerate(target) if t == 0]
            if mid is None or any(i >= len(mid) or not isinstance(mid[i], int) for i in copied):
                self.stats.skip(node, "the shape copies (0) a dim of the inner reshape that is not static")
                return False
            fixed = np.array([mid[i] if t == 0 else t for i, t in enumerate(target)], dtype=np.int64)
            node.replace_input_with(1, add_initializer(self.container, fixed, self.names("shape")))
        node.replace_input_with(0, first.inputs[0])
        drop_node(first)
        self.stats.add("reshapes_merged")
        return True

    def _try_slice(self, node: ir.Node) -> bool:
        dims = _dims(node.inputs[0])
        if "starts" in node.attributes:
            starts, ends = _attr_ints(node, "starts"), _attr_ints(node, "ends")
            axes, steps = _attr_ints(node, "axes"), None
        else:
            opt = [_ints(v) if v is not None else None for v in [*node.inputs[1:5], None, None][:4]]
            starts, ends, axes, steps = opt
            if len(node.inputs) > 4 and node.inputs[4] is not None and steps is None:
                return False
            if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
                return False
        if starts is None or ends is None:
            return False
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        if min(axes, default=0) < 0:
            if dims is None:
                return False
            axes = [a % len(dims) for a in axes]
        for start, end, axis, step in zip(starts, ends, axes, steps):
            d = dims[axis] if dims is not None and axis < len(dims) else None
            static = isinstance(d, int)
            if step != 1 or not (start == 0 or (static and start <= -d)):
                return False
            if not (end >= _SLICE_END_ALL or (static and end >= d)):
                return False
        return self._bypass(node, node.inputs[0], "slice_removed")

    def _try_concat(self, node: ir.Node) -> bool:
        if len(node.inputs) != 1:
            return False
        return self._bypass(node, node.inputs[0], "concat_removed")

    def _try_split(self, node: ir.Node) -> bool:
        if len(node.outputs) != 1:
            return False
        return self._bypass(node, node.inputs[0], "split_removed")


def _unused_value(value: ir.Value) -> bool:
    return not value.uses() and not value.is_graph_output()


# ---------------------------------------------------------------- the pass


#: Ops whose rules need their inputs' dtypes or shapes.
_NEEDS_TYPES = ("Cast", "CastLike", "Reshape", "Flatten", "Transpose", "Expand", "Slice", *_NEUTRAL)


@dataclasses.dataclass(frozen=True)
class EliminateIdentitiesConfig:
    #: Run onnx shape inference first when a candidate node's input lacks its dtype or shape.
    infer_shapes: bool = True


class EliminateIdentitiesPass(ShrinkPass):
    """Bypass nodes that return their input unchanged (see the module docstring for the rules)."""

    name = "eliminate_identities"
    Config = EliminateIdentitiesConfig
    changes = Changes.TOPOLOGY

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        if self.config.infer_shapes:
            wanted = [
                v for g in model.graphs() for n in g
                if n.op_type in _NEEDS_TYPES and is_default_domain(n) for v in n.inputs
            ]
            _shape_info.fill_missing(model, wanted)
        names = NameGen(model)
        for fn in model.functions.values():
            names.taken.update(v.name for n in fn.all_nodes() for v in n.outputs if v.name)
        eliminator = _Eliminator(stats, names)
        for container in iter_graphs(model):
            eliminator.run(container)
