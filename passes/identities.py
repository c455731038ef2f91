"""``eliminate_identities``: bypass nodes that provably return their input unchanged.

Rules, one ``_try_<rule>`` each (the stats key in brackets). Only default-domain nodes are touched.

1. ``Identity(x)`` -> x [identity_removed].
2. ``Dropout(x)`` in inference mode: no ``training_mode`` input or a constant false one (opset < 7:
   ``is_test`` not 0); refused while the mask output is used [dropout_removed].
3. ``Cast(x, to=T)`` with x already of type T (recorded, or proven from x's producer, see
   ``_value_facts.known_dtype``); ``CastLike(x, y)`` with x and y of one type [cast_removed].
4. ``Reshape(x, s)`` / ``Flatten(x)`` whose output shape provably equals x's: s constant, each entry
   equal to x's static dim, 0 (copy, without ``allowzero``) or a single -1 [reshape_removed].
5. ``Transpose(x)`` with the identity perm [transpose_removed].
6. ``Expand(x, s)`` where broadcasting s onto x's shape gives x's shape [expand_removed].
7. ``Pad(x)`` with all pads 0, any mode [pad_removed].
8. ``Mul``/``Div`` by 1, ``Add`` of 0, ``x - 0`` (never ``0 - x``), when the constant broadcasts to
   nothing larger than x's shape: into x's known shape, or, x's shape unknown (exports without
   value_info), when the constant's shape is all ones and x's rank is proven at least the constant's
   (``_value_facts.min_rank``: a Conv output has its weight's rank, elementwise ops keep their input's).
   The dtypes agree in any valid model (the ops take one type T) [neutral_removed].
9. ``Squeeze(Unsqueeze(x, a), a)`` and ``Unsqueeze(Squeeze(x, a), a)`` -> x [squeeze_pairs_removed].
10. ``Transpose(Transpose(x, p1), p2)`` -> ``Transpose(x, p1[p2])``, or x when that is the identity; the
    inner output must have no other user unless the result is x [transposes_merged].
11. ``Reshape(R(x), s)`` with R a Reshape/Flatten/Squeeze/Unsqueeze used only here -> ``Reshape(x, s)``.
    s must be constant (or ``allowzero=1``); its 0 entries copy the intermediate's dims, so they are
    replaced by its static dims, or the rule refuses [reshapes_merged].
12. ``Slice`` taking the whole tensor: steps 1, starts 0, ends at or past the dim (or >= 2**31-1 when the
    dim is unknown) [slice_removed].
13. ``Concat`` of one input [concat_removed]; ``Split`` into one output [split_removed].
14. Cast chains (``_cast_chains``): ``Cast(Cast(x, B), A)`` with x of type A -> x when B holds every value
    of A (int32 -> int64 -> int32) or x's values are proven to fit B, also through ops that only move
    elements (Slice, Gather, Reshape, Transpose, ...); ``Cast(Cast(x, B), C)`` -> ``Cast(x, C)`` when
    that converts every value the same way [casts_merged]. A narrowing round trip over values not
    proven to fit (``Shape`` of a tensor with symbolic dims through int32) is kept.
15. ``Reduce{Mean,Sum,Max,Min,Prod}`` over axes of static size 1 with ``keepdims``, and
    ``Unsqueeze(Reduce(x, axes, keepdims=0), axes)``: one element reduces to itself (``_reduces``)
    [reduce_removed].
16. ``Gather(Reshape(s, [-1]), 0)`` (or of ``Unsqueeze(s, 0)``) of a scalar s -> s [gathers_unwrapped].
17. ``Slice(Slice(x))`` on disjoint axes, constant parameters -> one Slice, when every reader of the
    inner Slice is such a Slice (``_slices``) [slices_merged].
18. ``LSTM``/``GRU``/``RNN`` initial states proven all zeros are dropped (the spec's default is 0;
    ``_zero_states``), leaving the run-time zeros subgraph exporters build to ``dead_code``
    [zero_states_dropped].

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
from onnxshrink.passes import _cast_chains, _reduces, _shape_info, _slices, _zero_states
from onnxshrink.passes import _value_facts as vf

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
            "Cast": (self._try_cast, self._try_cast_chain), "CastLike": (self._try_castlike,),
            "Reshape": (self._try_reshape, self._try_reshape_pair), "Flatten": (self._try_flatten,),
            "Transpose": (self._try_transpose, self._try_transpose_pair),
            "Expand": (self._try_expand,), "Pad": (self._try_pad,),
            "Squeeze": (self._try_squeeze_pair,),
            "Unsqueeze": (self._try_squeeze_pair, self._try_unsqueeze_reduce),
            **{op: (self._try_reduce,) for op in _reduces.EXACT},
            "Slice": (self._try_slice, self._try_slice_chain), "Concat": (self._try_concat,), "Split": (self._try_split,),
            "Gather": (self._try_gather_unwrap,),
            **{op: (self._try_neutral,) for op in _NEUTRAL},
            **{op: (self._try_zero_state,) for op in _zero_states.STATE_INPUTS},
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
        if x is None or to is None or vf.known_dtype(x) != ir.DataType(to):
            return False
        return self._bypass(node, x, "cast_removed")

    def _try_cast_chain(self, node: ir.Node) -> bool:
        p = _cast_chains.plan(node)
        if p is None:
            return False
        if p.target != p.source:  # Cast(Cast(x, B), C) -> Cast(x, C)
            node.replace_input_with(0, p.x)
            if _unused(p.inner):
                drop_node(p.inner)
            self.stats.add("casts_merged")
            return True
        if not p.movers:
            return self._bypass(node, p.x, "casts_merged", p.inner)
        if not self._bypass(node, p.movers[-1].outputs[0], "casts_merged"):
            return False
        p.movers[0].replace_input_with(0, p.x)  # the movers now run on x's type
        for mover in p.movers:
            mover.outputs[0].dtype = p.source
        if _unused(p.inner):
            drop_node(p.inner)
        return True

    def _try_castlike(self, node: ir.Node) -> bool:
        x, like = node.inputs[0], node.inputs[1]
        if x is None or like is None or x.dtype is None or x.dtype != like.dtype:
            return False
        return self._bypass(node, x, "cast_removed")

    def _try_reshape(self, node: ir.Node) -> bool:
        target = vf.ints(node.inputs[1]) if len(node.inputs) > 1 else vf.attr_ints(node, "shape")
        allowzero = bool(node.attributes.get_int("allowzero", 0))
        if target is None or not vf.reshape_keeps(vf.dims(node.inputs[0]), target, allowzero):
            return False
        return self._bypass(node, node.inputs[0], "reshape_removed")

    def _try_flatten(self, node: ir.Node) -> bool:
        dims = vf.dims(node.inputs[0])
        if dims is None or len(dims) != 2:
            return False
        axis = node.attributes.get_int("axis", 1)
        axis = axis + 2 if axis < 0 else axis
        if not (axis == 1 or (axis == 0 and dims[0] == 1) or (axis == 2 and dims[1] == 1)):
            return False
        return self._bypass(node, node.inputs[0], "reshape_removed")

    def _try_transpose(self, node: ir.Node) -> bool:
        dims = vf.dims(node.inputs[0])
        perm = vf.perm(node, None if dims is None else len(dims))
        if perm is None or perm != list(range(len(perm))):
            return False
        return self._bypass(node, node.inputs[0], "transpose_removed")

    def _try_expand(self, node: ir.Node) -> bool:
        shape = vf.ints(node.inputs[1])
        if shape is None or not vf.broadcast_keeps(vf.dims(node.inputs[0]), shape):
            return False
        return self._bypass(node, node.inputs[0], "expand_removed")

    def _try_pad(self, node: ir.Node) -> bool:
        if "pads" in node.attributes or "paddings" in node.attributes:
            pads = vf.attr_ints(node, "pads" if "pads" in node.attributes else "paddings")
        else:
            pads = vf.ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None or any(pads):
            return False
        return self._bypass(node, node.inputs[0], "pad_removed")

    def _try_neutral(self, node: ir.Node) -> bool:
        neutral, either_side = _NEUTRAL[node.op_type]
        for ci in (1, 0) if either_side else (1,):
            c, x = node.inputs[ci], node.inputs[1 - ci]
            if x is None or scalar_value(c) != neutral:
                continue
            reason = vf.neutral_blocker(x, c, const_array(c))
            if reason is None:
                return self._bypass(node, x, "neutral_removed")
            if reason:
                self.stats.skip(node, reason)
        return False

    def _try_squeeze_pair(self, node: ir.Node) -> bool:
        other = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
        first = _producer(node, (other,))
        if first is None:
            return False
        a1, a2, x = vf.axes(first), vf.axes(node), first.inputs[0]
        if not a1 or not a2:
            return False
        if min(a1 + a2) < 0:  # both axes lists index the rank of the unsqueezed tensor
            dims = vf.dims(x)
            if dims is None:
                return False
            rank = len(dims) + (len(a1) if other == "Unsqueeze" else 0)
            a1, a2 = [a % rank for a in a1], [a % rank for a in a2]
        if sorted(a1) != sorted(a2):
            return False
        return self._bypass(node, x, "squeeze_pairs_removed", first)

    def _try_reduce(self, node: ir.Node) -> bool:
        return self._bypass(node, _reduces.kept_reduce_source(node), "reduce_removed")

    def _try_unsqueeze_reduce(self, node: ir.Node) -> bool:
        found = _reduces.unsqueezed_reduce(node)
        return found is not None and self._bypass(node, found[0], "reduce_removed", found[1])

    def _try_transpose_pair(self, node: ir.Node) -> bool:
        first = _producer(node, ("Transpose",))
        if first is None:
            return False
        x = first.inputs[0]
        rank = None if vf.dims(x) is None else len(vf.dims(x))
        p1, p2 = vf.perm(first, rank), vf.perm(node, rank)
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
        target = vf.ints(node.inputs[1])
        if not allowzero and (target is None or 0 in target):
            if target is None:
                return False
            mid = vf.dims(node.inputs[0])
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
        dims = vf.dims(node.inputs[0])
        p = _slices.params(node, len(dims) if dims is not None else None)
        if p is None:
            return False
        starts, ends, axes, steps = p
        for start, end, axis, step in zip(starts, ends, axes, steps):
            d = dims[axis] if dims is not None and axis < len(dims) else None
            static = isinstance(d, int)
            if step != 1 or not (start == 0 or (static and start <= -d)):
                return False
            if not (end >= _SLICE_END_ALL or (static and end >= d)):
                return False
        return self._bypass(node, node.inputs[0], "slice_removed")

    def _try_slice_chain(self, node: ir.Node) -> bool:
        if not _slices.merge_chain(node, self.container, self.names):
            return False
        self.stats.add("slices_merged")
        return True

    def _try_gather_unwrap(self, node: ir.Node) -> bool:
        """``Gather(Reshape(s, [1 or -1]) or Unsqueeze(s, [0]), 0 or -1, axis=0)`` of a scalar s -> s."""
        idx = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if idx is None or idx.ndim != 0 or int(idx) not in (0, -1) or node.attributes.get_int("axis", 0) not in (0, -1):
            return False
        first = _producer(node, ("Reshape", "Unsqueeze"))
        s = None if first is None else first.inputs[0]
        if s is None or s.shape is None or len(s.shape) != 0 or not _only_feeds(node.inputs[0], node):
            return False
        wrap = vf.ints(first.inputs[1]) if first.op_type == "Reshape" else vf.axes(first)
        if wrap not in (([1], [-1]) if first.op_type == "Reshape" else ([0], [-1])):
            return False
        return self._bypass(node, s, "gathers_unwrapped", first)

    def _try_concat(self, node: ir.Node) -> bool:
        if len(node.inputs) != 1:
            return False
        return self._bypass(node, node.inputs[0], "concat_removed")

    def _try_split(self, node: ir.Node) -> bool:
        if len(node.outputs) != 1:
            return False
        return self._bypass(node, node.inputs[0], "split_removed")


    def _try_zero_state(self, node: ir.Node) -> bool:
        dropped = _zero_states.drop_zero_states(node)
        if dropped:
            self.stats.add("zero_states_dropped", dropped)
        return bool(dropped)


def _unused_value(value: ir.Value) -> bool:
    return not value.uses() and not value.is_graph_output()


# ---------------------------------------------------------------- the pass


#: Ops whose rules need their inputs' dtypes or shapes.
_NEEDS_TYPES = ("Cast", "CastLike", "Reshape", "Flatten", "Transpose", "Expand", "Slice", "Unsqueeze",
                *_NEUTRAL, *_reduces.EXACT)


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
