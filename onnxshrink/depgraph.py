"""The pruning dependency graph of an ONNX model.

Nodes of the networkx graph are channel slots ``(value, axes)``; edges come from ONE explicit table of
per-op channel rules, ``RULES`` (families in :mod:`onnxshrink.channel_rules` and
:mod:`onnxshrink.channel_layout`). Each edge carries an index map (identity, concat/split/slice
offsets, flatten strides, group residues, head splits). Building starts from the output channels of
every Conv/ConvTranspose/Gemm/MatMul and walks every op that touches a slot.

Connected components of the slot graph are the coupled groups of layers. Inside them, cells (one
index of one slot) joined through the index maps form *atoms*: the smallest sets of channels that can
be removed together (a channel, a whole conv group, an attention head with its Q/K/V/out features).
Atoms touching the same slots form a :class:`Group`, the unit a plan prunes. A group is blocked,
never pruned, when one of its slots is a graph input or output, is read inside a subgraph, or reaches
an op that is not in the table or that the table refuses; ``Group.stops`` says which op and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxshrink import channel_layout as layout
from onnxshrink import channel_rules as cr
from onnxshrink import channel_weights as weights
from onnxshrink import depgraph_cells
from onnxshrink.graph_utils import const_shape, int_attr

logger = logging.getLogger(__name__)

UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu",
    "Erf", "Softplus", "Softsign", "Mish", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Identity",
    "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Dropout",
)
ELEMENTWISE_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Clip")
POOL_OPS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")

#: THE rule table: op type (default ONNX domain) -> channel rule. Any other op is a barrier.
RULES: dict[str, cr.RuleFn] = {
    "Conv": weights.conv,
    "ConvTranspose": weights.conv,
    "Gemm": weights.gemm,
    "MatMul": weights.matmul,
    "BatchNormalization": cr.batchnorm,
    "InstanceNormalization": cr.batchnorm,
    **{op: cr.unary for op in UNARY_OPS},
    **{op: cr.elementwise for op in ELEMENTWISE_OPS},
    **{op: cr.pool for op in POOL_OPS},
    **{op: cr.reduce for op in REDUCE_OPS},
    "Resize": cr.resize,
    "Upsample": cr.resize,
    "Transpose": cr.transpose,
    "Softmax": cr.softmax,
    "LogSoftmax": cr.softmax,
    "Concat": layout.concat,
    "Split": layout.split,
    "Slice": layout.slice_,
    "Gather": cr.gather,
    "Reshape": layout.reshape,
    "Flatten": layout.reshape,
    "Squeeze": layout.reshape,
    "Unsqueeze": layout.reshape,
    "Shape": layout.shape_op,
    "Constant": cr.constant,
}

#: Ops whose constant weight has an output-channel axis and an input-channel axis: (out, in).
WEIGHT_AXES = {"Conv": (0, 1), "ConvTranspose": (1, 0), "Gemm": None, "MatMul": (1, 0)}


@dataclasses.dataclass(frozen=True)
class Slot:
    value: ir.Value
    axes: tuple[int, ...]

    def label(self) -> str:
        return f"{value_name(self.value)}:{','.join(map(str, self.axes))}"


@dataclasses.dataclass(frozen=True)
class Stop:
    """Why channels stop: the op that refused them, the value they reached it through, the reason."""

    node: str
    op_type: str
    value: str
    reason: str

    def __str__(self) -> str:
        if self.op_type == "graph":  # stopped at the value itself (a graph input/output, a dynamic dim)
            return f"value {self.value!r}: {self.reason}"
        return f"{self.op_type} {self.node!r} (via {self.value!r}): {self.reason}"


@dataclasses.dataclass
class Group:
    """Atoms touching the same slots: the unit a plan prunes."""

    id: int
    key: str
    slots: list[Slot]
    atoms: list[dict[Slot, np.ndarray]]  # per atom: slot -> its cell indices
    stops: list[Stop]
    producers: list[str]  # weight ops whose output channels are in the group
    consumers: list[str]  # weight ops whose input channels are in the group
    nodes: list[str]  # every op joining the group's slots

    @property
    def blocked(self) -> bool:
        return bool(self.stops)

    @property
    def width(self) -> int:
        return len(self.atoms)

    def atom_size(self, slot: Slot) -> int:
        return len(self.atoms[0][slot]) if self.atoms else 0

    def channels_per_atom(self) -> int:
        """Cells per atom on the narrowest constant weight slot (1 for plain channels, d for heads)."""
        sizes = [self.atom_size(s) for s in self.slots if is_const(s.value)]
        sizes = [s for s in sizes if s] or [self.atom_size(s) for s in self.slots] or [1]
        return min(sizes)

    def describe(self) -> dict:
        return {
            "id": self.id, "key": self.key, "atoms": self.width,
            "channels_per_atom": self.channels_per_atom(), "producers": self.producers,
            "consumers": self.consumers, "nodes": self.nodes, "stops": [str(s) for s in self.stops],
        }


def is_const(v: ir.Value) -> bool:
    """A constant the pass can slice: a (non-input) initializer or a Constant node's output."""
    if v.is_graph_input():
        return False
    prod = v.producer()
    return v.const_value is not None or (prod is not None and prod.op_type == "Constant")


def value_name(v: ir.Value) -> str:
    if v.name:
        return v.name
    prod = v.producer()
    return f"{prod.name or prod.op_type}#{v.index()}" if prod is not None else "<anonymous>"


class DepGraph:
    """Build with :func:`build`. ``graph``: networkx slot graph; ``groups``: prunable units."""

    def __init__(self, model: ir.Model, ctx: cr.Ctx) -> None:
        import networkx as nx  # imported on use: `onnxshrink optimize` loads this module but never builds one

        self.model = model
        self.ctx = ctx
        self.graph = nx.Graph()
        self.blocked: dict[Slot, list[Stop]] = defaultdict(list)
        self.groups: list[Group] = []
        self._links: list[tuple[Slot, Slot, np.ndarray | None, np.ndarray | None, str]] = []
        self._order = {n: i for i, n in enumerate(model.graph)}

    # ------------------------------------------------------------ building

    def seed_slots(self) -> list[Slot]:
        """Output channels of every op with a constant weight (the places channels are made)."""
        seeds = []
        for node in self.model.graph:
            if node.op_type in WEIGHT_AXES and len(node.inputs) > 1 and weight_axes(node, 1):
                y = node.outputs[0]
                shape = self.ctx.shape(y)
                if shape:
                    axis = 1 if node.op_type in ("Conv", "ConvTranspose") else len(shape) - 1
                    seeds.append(Slot(y, (axis,)))
        return seeds

    def walk(self, seeds) -> None:
        todo, seen = list(seeds), set()
        while todo:
            slot = todo.pop()
            if slot in seen:
                continue
            seen.add(slot)
            self._ensure(slot)
            todo.extend(self._expand(slot))

    def _ensure(self, slot: Slot) -> None:
        if slot not in self.graph:
            self.graph.add_node(slot, dims=self.ctx.dims(slot.value, slot.axes))

    def _expand(self, slot: Slot) -> list[Slot]:
        v = slot.value
        dims = self.ctx.dims(v, slot.axes)
        if dims is None:
            self._block(slot, None, "channel dimension not static")
            return []
        if v.is_graph_input() or v.is_graph_output():
            self._block(slot, None, "graph inputs and outputs never change")
        out = []
        for node, port in self._ports(v):
            if node.graph is not self.model.graph:
                self._block(slot, node, "read inside a subgraph (If/Loop/Scan body)")
                continue
            rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                self._block(slot, node, f"{node.domain + '.' if node.domain else ''}{node.op_type} "
                            "is not in the channel rule table")
                continue
            result = rule(node, port, slot.axes, self.ctx)
            if isinstance(result, cr.Barrier):
                self._block(slot, node, result.reason)
                continue
            for link in result:
                tgt = Slot(link.value, tuple(link.axes))
                if self.ctx.dims(tgt.value, tgt.axes) is None:
                    self._block(slot, node, f"channel dims of {value_name(tgt.value)!r} unknown")
                    continue
                self._add_link(slot, tgt, link.src, link.dst, node)
                out.append(tgt)
        return out

    def _ports(self, v: ir.Value):
        prod = v.producer()
        if prod is not None:
            yield prod, ("out", v.index())
        seen = set()
        for use in v.uses():
            if (use.node, use.idx) not in seen:
                seen.add((use.node, use.idx))
                yield use.node, ("in", use.idx)

    def _block(self, slot: Slot, node: ir.Node | None, reason: str) -> None:
        stop = Stop(node.name or "<unnamed>" if node is not None else "-",
                    node.op_type if node is not None else "graph", value_name(slot.value), reason)
        if stop not in self.blocked[slot]:
            self.blocked[slot].append(stop)

    def _add_link(self, a: Slot, b: Slot, src, dst, node) -> None:
        self._ensure(a)
        self._ensure(b)
        self.graph.add_edge(a, b)
        self.graph.edges[a, b].setdefault("nodes", set()).add(node)
        self._links.append((a, b, src, dst, node))

    def link_overlaps(self) -> None:
        """Two slots of one value sharing axes: a cell of one goes with the cells it overlaps."""
        by_value = defaultdict(list)
        for s in list(self.graph.nodes):
            by_value[s.value].append(s)
        for slots in by_value.values():
            for i, a in enumerate(slots):
                for b in slots[i + 1:]:
                    common = tuple(x for x in a.axes if x in b.axes)
                    if not common:
                        continue
                    mid = Slot(a.value, common)
                    for s in (a, b):
                        if s != mid:
                            keep = [s.axes.index(x) for x in common]
                            link = cr.projection(mid.value, common, self.ctx.dims(s.value, s.axes), keep)
                            self._add_link(s, mid, link.src, link.dst, None)

    # ------------------------------------------------------------ atoms and groups

    def atoms(self) -> tuple[dict, np.ndarray]:
        """Cell offsets per slot and the atom label of every cell (see :mod:`depgraph_cells`)."""
        return depgraph_cells.atoms(self.graph, self._links)

    def make_groups(self) -> None:
        offsets, labels = self.atoms()
        slot_of = np.empty(len(labels), np.int64)
        slots = list(self.graph.nodes)
        for i, s in enumerate(slots):
            n = int(np.prod(self.graph.nodes[s]["dims"] or (0,)))
            slot_of[offsets[s]: offsets[s] + n] = i
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        by_signature: dict[tuple, list[np.ndarray]] = defaultdict(list)
        for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(order)]):
            if b > a:
                cells = order[a:b]
                by_signature[tuple(np.unique(slot_of[cells]))].append(cells)
        index = {s: i for i, s in enumerate(slots)}
        units = [self._group(sig, atoms, slots, index, offsets, slot_of) for sig, atoms in by_signature.items()]
        units.sort(key=lambda g: (self._position(g), g.key))
        for i, g in enumerate(units):
            g.id = i
        self.groups = units

    def _group(self, sig, atom_cells, slots, index, offsets, slot_of) -> Group:
        gslots = sorted((slots[i] for i in sig), key=lambda s: s.label())
        atoms = _split_atoms(gslots, atom_cells, index, offsets, slot_of)
        first = gslots[0]
        atoms.sort(key=lambda a: int(a[first][0]))
        stops = [st for s in gslots for st in self.blocked.get(s, [])]
        nodes = set()
        for a, b in self.graph.subgraph(gslots).edges:
            nodes |= {n for n in self.graph.edges[a, b]["nodes"] if n is not None}
        producers, consumers = self._weight_roles(gslots)
        key = hashlib.sha1("|".join(s.label() for s in gslots).encode()).hexdigest()[:12]
        names = sorted({n.name or n.op_type for n in nodes}, key=str)
        return Group(-1, key, gslots, atoms, stops, producers, consumers, names)

    def _weight_roles(self, gslots) -> tuple[list[str], list[str]]:
        producers, consumers = [], []
        for s in gslots:
            if not is_const(s.value):
                continue
            for use in s.value.uses():
                node = use.node
                axes = weight_axes(node, use.idx)
                if axes is None:
                    continue
                name = node.name or node.op_type
                if s.axes == (axes[0],) and name not in producers:
                    producers.append(name)
                elif s.axes == (axes[1],) and name not in consumers:
                    consumers.append(name)
        return producers, consumers

    def _position(self, g: Group) -> int:
        best = len(self._order)
        for s in g.slots:
            node = s.value.producer() or next((u.node for u in s.value.uses()), None)
            if node is not None:
                best = min(best, self._order.get(node, best))
        return best

    # ------------------------------------------------------------ reporting

    def stops(self) -> list[tuple[int, Stop]]:
        return [(g.id, st) for g in self.groups for st in g.stops]

    def summary(self) -> dict:
        import networkx as nx

        return {
            "slots": self.graph.number_of_nodes(),
            "edges": self.graph.number_of_edges(),
            "components": nx.number_connected_components(self.graph),
            "groups": [g.describe() for g in self.groups],
        }


def weight_axes(node: ir.Node, idx: int) -> tuple[int, int] | None:
    """(out axis, in axis) of a weight op's constant weight input ``idx``, else None."""
    shape = const_shape(node.inputs[idx]) if idx < len(node.inputs) else None
    if node.domain not in ("", "ai.onnx") or shape is None:
        return None
    if node.op_type in ("Conv", "ConvTranspose") and idx == 1:
        return WEIGHT_AXES[node.op_type]
    if node.op_type == "Gemm" and idx == 1:
        return (0, 1) if int_attr(node, "transB", 0) else (1, 0)
    if node.op_type == "MatMul" and idx == 1 and len(shape) == 2:
        return (1, 0)
    return None


def build(model: ir.Model, *, grouped: str = "auto", shapes: dict | None = None) -> DepGraph:
    """The dependency graph and pruning groups of ``model``'s main graph (the model is not changed)."""
    if grouped not in ("auto", "groups"):
        raise ValueError(f"grouped must be 'auto' or 'groups', not {grouped!r}")
    shapes = dict(shapes) if shapes is not None else cr.infer_shapes(model)
    for node in model.graph:
        if node.op_type == "Reshape" and node.outputs[0] in shapes and node.inputs[0] in shapes:
            shapes[node.outputs[0]] = layout.resolve_minus_one(
                shapes[node.inputs[0]], shapes[node.outputs[0]], layout.shape_entries(node, shapes))
    ctx = cr.Ctx(shapes, grouped=grouped)
    dg = DepGraph(model, ctx)
    dg.walk(dg.seed_slots())
    dg.link_overlaps()
    dg.make_groups()
    logger.info("dependency graph: %d slots, %d groups (%d blocked)", dg.graph.number_of_nodes(),
                len(dg.groups), sum(g.blocked for g in dg.groups))
    return dg


def _split_atoms(gslots, atom_cells, index, offsets, slot_of) -> list[dict]:
    """Per atom, its cells in each of the group's slots, as sorted offsets within the slot. One sort
    over the group's cells (atom, slot, offset), not a mask per atom and slot: groups with hundreds of
    slots and atoms (a detector's backbone) would otherwise cost atoms x slots passes."""
    cells = np.concatenate(atom_cells)
    atom = np.repeat(np.arange(len(atom_cells)), [len(c) for c in atom_cells])
    gidx = np.array([index[s] for s in gslots])
    rank = np.argsort(gidx)
    local_slot = rank[np.searchsorted(gidx[rank], slot_of[cells])]
    base = np.array([offsets[s] for s in gslots], np.int64)
    local = cells - base[local_slot]
    order = np.lexsort((local, local_slot, atom))
    counts = np.bincount(atom * len(gslots) + local_slot, minlength=len(atom_cells) * len(gslots))
    flat, ends = local[order], np.cumsum(counts).tolist()
    parts = [flat[a:b] for a, b in zip([0, *ends[:-1]], ends)]  # np.split's per-piece cost topped the profile
    n = len(gslots)
    return [{s: parts[a * n + j] for j, s in enumerate(gslots)} for a in range(len(atom_cells))]

