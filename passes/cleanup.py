"""Cleanup passes: dead code, duplicate initializers, common subexpressions.

Rules of ``dead_code``:
1. A node none of whose outputs is used (by a node, a subgraph, or as a graph output) is removed, in
   every graph, subgraph and function; removing it may make its producers dead in turn. A value read
   only inside a subgraph (an outer-scope capture) counts as used.
2. An initializer no node reads is removed, in the main graph and in subgraphs, unless it is also a
   graph input (an overridable input is part of the interface).
3. A local function no node calls (directly, in a subgraph or from another function) is removed.
4. An opset import of a domain no remaining node uses is removed from the model and from functions
   (the default domain is always kept).
Never changed: graph inputs; Loop/Scan body inputs (their number and order are fixed by the op's
spec); function inputs, even unused ones (they are the function's signature, and callers pass them
by position).

``dedup_initializers`` and ``cse`` are described in their classes.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections import defaultdict

import onnx_ir as ir
from onnxshrink.passes import _tensor_bytes as tb
from onnxshrink.passes._fold_guards import is_non_deterministic

from onnxshrink.graph_utils import DEFAULT_DOMAINS, drop_node, own_type
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass, iter_graphs

logger = logging.getLogger(__name__)

_SUBGRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


# ---------------------------------------------------------------- dead_code


def _is_dead(node: ir.Node) -> bool:
    return all(not out.uses() and not out.is_graph_output() for out in node.outputs)


def _remove_dead_nodes(graph, stats: PassStats) -> None:
    for node in reversed(list(graph)):
        if _is_dead(node):
            drop_node(node)
            stats.add("nodes_removed")


def _remove_unused_initializers(graph: ir.Graph, stats: PassStats) -> None:
    for name, value in list(graph.initializers.items()):
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        graph.initializers.pop(name)
        stats.add("initializers_removed")


def _called_functions(model: ir.Model) -> set:
    called = set()
    work = [model.graph]
    while work:
        g = work.pop()
        for node in g.all_nodes():
            key = (node.domain, node.op_type, node.overload)
            if key in model.functions and key not in called:
                called.add(key)
                work.append(model.functions[key])
    return called


def _remove_unused_opsets(imports: dict[str, int], nodes, stats: PassStats) -> None:
    used = {node.domain for node in nodes}
    if used & set(DEFAULT_DOMAINS):
        used |= set(DEFAULT_DOMAINS)
    for domain in list(imports):
        if domain not in used and domain not in DEFAULT_DOMAINS:
            del imports[domain]
            stats.add("opset_imports_removed")


@dataclasses.dataclass(frozen=True)
class DeadCodeConfig:
    remove_functions: bool = True
    remove_opset_imports: bool = True


class DeadCodePass(ShrinkPass):
    """Remove unused nodes, initializers, functions and opset imports (see module rules)."""

    name = "dead_code"
    Config = DeadCodeConfig
    changes = Changes.TOPOLOGY

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        # Inner graphs first: a subgraph's dead node may be the only user of an outer value.
        graphs = list(iter_graphs(model))
        for graph in reversed(graphs):
            _remove_dead_nodes(graph, stats)
        for graph in graphs:
            if isinstance(graph, ir.Graph):
                _remove_unused_initializers(graph, stats)
        if self.config.remove_functions:
            called = _called_functions(model)
            for key in list(model.functions):
                if key not in called:
                    del model.functions[key]
                    stats.add("functions_removed")
        if self.config.remove_opset_imports:
            nodes = [*model.graph.all_nodes(), *(n for f in model.functions.values() for n in f.all_nodes())]
            _remove_unused_opsets(model.opset_imports, nodes, stats)
            for function in model.functions.values():
                _remove_unused_opsets(function.opset_imports, function.all_nodes(), stats)


# ---------------------------------------------------------------- dedup_initializers


def _scoped_graphs(model: ir.Model):
    """(graph, parent graph or None) for the main graph, its subgraphs and subgraphs in functions,
    parents before children. Function bodies see no outer scope."""
    work = [(model.graph, None)]
    for fn in model.functions.values():
        work.extend((sub, None) for node in fn for sub in _node_subgraphs(node))
    while work:
        graph, parent = work.pop(0)
        yield graph, parent
        work.extend((sub, graph) for node in graph for sub in _node_subgraphs(node))


def _node_subgraphs(node: ir.Node):
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.value


class DedupInitializersPass(ShrinkPass):
    """Merge initializers with the same dtype, shape and bytes into the first one.

    Candidates are grouped by (dtype, shape, byte size) from metadata first, so a tensor with no
    same-sized twin is never read; twins are split by a sample (the whole bytes of a tensor up to
    64 KiB, which settles it; else 4 KiB from its start, middle and end), and only tensors whose
    samples collide are hashed (external data streamed from disk, never loaded whole) and, on equal
    hashes, compared byte by byte. Samples and hashes are cached per tensor object for the life of
    the pass instance, so a fixed-point loop reads each tensor at most once. A subgraph initializer
    may merge into an identical one of an enclosing graph (outer values are visible inside), never
    the reverse. Never merged: initializers that are graph inputs (they can be overridden at run
    time) or graph outputs (names of the interface).
    """

    name = "dedup_initializers"
    changes = Changes.TOPOLOGY | Changes.WEIGHTS

    def __init__(self, config=None, **options) -> None:
        super().__init__(config, **options)
        self._samples: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        parents: dict = {}
        groups: dict[tuple, list] = defaultdict(list)
        for graph, parent in _scoped_graphs(model):
            parents[graph] = parent
            for value in graph.initializers.values():
                t = value.const_value
                if t is None or value.is_graph_input() or value.is_graph_output():
                    continue
                groups[(t.dtype, tuple(t.shape), t.nbytes)].append((graph, value))
        for members in groups.values():
            if len(members) < 2:
                continue
            by_sample: dict[bytes | None, list] = defaultdict(list)
            for member in members:
                by_sample[self._cached(self._samples, member[1].const_value, tb.sample)].append(member)
            for fingerprint, twins in by_sample.items():
                if len(twins) > 1:
                    whole = fingerprint is not None and members[0][1].const_value.nbytes <= tb.SMALL_BYTES
                    self._merge_group(twins, parents, stats, whole)

    def _cached(self, cache: weakref.WeakKeyDictionary, tensor, compute):
        try:
            return cache[tensor]
        except KeyError:
            result = cache[tensor] = compute(tensor)
            return result
        except TypeError:  # a tensor type that takes no weak references
            return compute(tensor)

    def _merge_group(self, members: list, parents: dict, stats: PassStats, whole: bool) -> None:
        """Merge members with equal bytes; ``whole``: their samples were their whole bytes (equal)."""
        kept: dict[bytes, list] = defaultdict(list)
        for graph, value in members:
            key = b"" if whole else self._cached(self._digests, value.const_value, tb.digest)
            keeper = next(
                (
                    k
                    for g, k in kept[key]
                    if _encloses(g, graph, parents) and (whole or tb.same_bytes(k.const_value, value.const_value))
                ),
                None,
            )
            if keeper is None:
                kept[key].append((graph, value))
                continue
            value.replace_all_uses_with(keeper)
            graph.initializers.pop(value.name)
            stats.add("initializers_merged")
            stats.add("bytes_saved", value.const_value.nbytes)
            logger.debug("initializer %r merged into %r", value.name, keeper.name)


def _encloses(outer, graph, parents: dict) -> bool:
    while graph is not None:
        if graph is outer:
            return True
        graph = parents.get(graph)
    return False


# ---------------------------------------------------------------- cse

#: Tensor attributes up to this many bytes are keyed by their bytes, bigger ones by a digest.
_INLINE_TENSOR_BYTES = 256


def _attr_key(attr: ir.Attr):
    """A hashable, exact key of an attribute value; floats by their bits (0.0 and -0.0 differ)."""
    if attr.is_ref():
        return ("ref", attr.ref_attr_name, attr.type)
    kind, value = attr.type, attr.value
    if kind == ir.AttributeType.FLOAT:
        return (kind, float(value).hex())
    if kind == ir.AttributeType.FLOATS:
        return (kind, tuple(float(v).hex() for v in value))
    if kind in (ir.AttributeType.INTS, ir.AttributeType.STRINGS):
        return (kind, tuple(value))
    if kind == ir.AttributeType.TENSOR:
        return (kind, _tensor_key(value))
    if kind == ir.AttributeType.TENSORS:
        return (kind, tuple(_tensor_key(t) for t in value))
    if kind in (ir.AttributeType.INT, ir.AttributeType.STRING):
        return (kind, value)
    return (kind, str(value))  # type protos: their text form is exact


def _tensor_key(tensor) -> tuple:
    data = tensor.tobytes() if tensor.dtype != ir.DataType.STRING else None
    if data is not None and len(data) <= _INLINE_TENSOR_BYTES:
        return (tensor.dtype, tuple(tensor.shape), data)
    return (tensor.dtype, tuple(tensor.shape), "digest", tb.digest(tensor))


def _tensor_attrs(node: ir.Node) -> list:
    return [a.value for a in node.attributes.values() if a.type == ir.AttributeType.TENSOR and not a.is_ref()]


@dataclasses.dataclass(frozen=True)
class CseConfig:
    #: Domains whose ops are pure functions of their inputs; other custom ops may keep state.
    domains: tuple[str, ...] = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))


class CsePass(ShrinkPass):
    """Common-subexpression elimination, in one linear sweep per graph.

    A node with the same domain, op, overload, input values (the same objects) and equal attributes
    as an earlier node of the same graph is replaced by it; its users (inside subgraphs too) read the
    earlier node's outputs, so chains collapse in one run. Identical Constant nodes merge the same
    way. Not merged: non-deterministic ops (reported), nodes with subgraphs, ops of other domains
    than ``domains``, calls of local functions that contain a non-deterministic op, and a pair whose
    outputs are both graph outputs (reported; the interface keeps both names). When only the later
    output is a graph output, the earlier value takes its name.
    """

    name = "cse"
    Config = CseConfig
    changes = Changes.TOPOLOGY

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        pure_functions = _pure_functions(model)
        for graph in iter_graphs(model):
            self._sweep(graph, model, pure_functions, stats)

    def _key(self, node: ir.Node, model: ir.Model, pure_functions: set) -> tuple | None:
        fn_key = (node.domain, node.op_type, node.overload)
        if fn_key in model.functions:
            if fn_key not in pure_functions:
                return None
        elif node.domain not in self.config.domains:
            return None
        attrs = []
        for name in sorted(node.attributes):
            attr = node.attributes[name]
            if attr.type in _SUBGRAPH_ATTRS:
                return None
            attrs.append((name, _attr_key(attr)))
        inputs = list(node.inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        return (*fn_key, len(node.outputs), tuple(inputs), tuple(attrs))

    def _sweep(self, graph, model: ir.Model, pure_functions: set, stats: PassStats) -> None:
        seen: dict[tuple, ir.Node] = {}
        for node in list(graph):
            key = self._key(node, model, pure_functions)
            if key is None:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
            elif is_non_deterministic(node):
                stats.skip(node, "non-deterministic op: identical nodes draw different values")
            elif not all(tb.same_bytes(a, b) for a, b in zip(_tensor_attrs(first), _tensor_attrs(node))):
                continue  # a digest collision; never seen, but never trusted either
            else:
                reason = _merge(first, node)
                if reason:
                    stats.skip(node, reason)
                else:
                    stats.add("nodes_merged")


def _merge(keep: ir.Node, dup: ir.Node) -> str | None:
    """Route ``dup``'s users to ``keep``'s outputs and remove ``dup``; or say why not."""
    pairs = list(zip(keep.outputs, dup.outputs))
    if any(d.is_graph_output() and k.is_graph_output() for k, d in pairs):
        return f"both its outputs and those of identical node {keep.name!r} are graph outputs"
    for k, d in pairs:
        if d.is_graph_output():  # k takes d's place in the interface: its name, type and shape
            name, d.name = d.name, None
            k.name = name
            k.type = own_type(d) or k.type
            k.shape = d.shape or k.shape
        d.replace_all_uses_with(k, replace_graph_outputs=True)
    dup.graph.remove(dup, safe=True)
    return None


def _pure_functions(model: ir.Model) -> set:
    """Keys of local functions whose bodies (and callees) hold no non-deterministic op."""
    impure: set = set()
    changed = True
    while changed:
        changed = False
        for key, fn in model.functions.items():
            if key in impure:
                continue
            for node in fn.all_nodes():
                callee = (node.domain, node.op_type, node.overload)
                if is_non_deterministic(node) or callee in impure:
                    impure.add(key)
                    changed = True
                    break
    return set(model.functions) - impure
