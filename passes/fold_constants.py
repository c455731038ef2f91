"""Constant folding: evaluate nodes whose inputs are all constant, and shape computations on static dims.

Rules of ``fold_constants`` (every graph, subgraph and function, in order, so a folded value feeds the
nodes after it in the same run):
0. A Constant node of a graph or subgraph (not a function, not a graph output) becomes an
   initializer of the same name (``constants_to_initializers``), as onnxsim and onnxslim do.
1. A default-domain node whose inputs are all constant (initializers that are not graph inputs,
   Constant nodes, constants of an outer scope) is evaluated (see ``_const_eval``) and its outputs
   become initializers (a Constant node in a function, or for a graph output, whose name is kept).
2. Shape/Size/Gather/Concat/Slice/Unsqueeze/Squeeze/Cast chains are followed through static dims
   (see ``_shape_values``); a fully static result becomes a constant (``shape_ops_folded``), and a
   ``Reshape`` whose shape copies dims of its own input (taken from its Shape, or with
   ``trust_dim_params`` a dim of the same ``dim_param`` name at the same position) gets a constant
   shape with 0 for them (``reshape_shapes_folded``). Missing shapes are first inferred with onnx
   shape inference (kept as value_info, see ``_shape_info``); when shape folding made new shapes
   inferable, the pass infers again and sweeps the graph again (at most ``_MAX_ROUNDS`` times).
3. ``If`` with a constant condition is replaced by the taken branch (``if_inlined``).
Refused, with the reason in ``stats.skip``: non-deterministic ops, non-default domains, nodes with
subgraphs, Q/DQ nodes (``keep_ops``: folding them would undo quantization), outputs over
``max_output_bytes``, outputs over ``small_output_bytes`` that are more than ``max_growth`` times the
input bytes they free (Expand/Tile/ConstantOfShape blowing up, or a weight shared elsewhere being
copied), inputs over ``max_input_bytes``, results whose dtype or shape disagree with the graph, an
``If`` branch whose names clash with the enclosing scopes, and with ``keep_float16_storage`` a
``Cast(float16 constant -> FLOAT)`` whose output would pass ``small_output_bytes``. Nodes it orphans
are left to ``dead_code``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnxshrink.passes import _const_eval as const_eval
from onnxshrink.passes import _shape_info
from onnxshrink.passes import _shape_values as shape_values
from onnxshrink.passes._fold_guards import defined_names, inline_if_refusal, predicted_bytes, refusal

from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import (
    NameGen,
    const_array,
    drop_node,
    is_constant,
    is_default_domain,
    own_type,
    subgraphs_of,
)
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass

logger = logging.getLogger(__name__)

#: Sweeps of the main graph per run: another one only after shape folding made new shapes inferable.
_MAX_ROUNDS = 8


@dataclasses.dataclass(frozen=True)
class FoldConstantsConfig:
    max_output_bytes: int = 1 << 20
    max_growth: float = 2.0
    small_output_bytes: int = 4096
    max_input_bytes: int = 64 << 20
    evaluator: str = "onnxruntime"
    keep_ops: tuple[str, ...] = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
    inline_if: bool = True
    constants_to_initializers: bool = True
    #: Dims with the same ``dim_param`` name are the same size (the ONNX convention); see _shape_values.
    trust_dim_params: bool = True
    #: Leave ``Cast(float16 constant -> FLOAT)`` over ``small_output_bytes`` unfolded: the model keeps
    #: the weights it stores as float16 (folding doubles their bytes; ONNX Runtime folds the Cast, and
    #: fuses what follows, when it loads the model). The ``default`` preset sets it; quantization and
    #: pruning, which need the weights as constants, do not.
    keep_float16_storage: bool = False

    def __post_init__(self) -> None:
        if self.evaluator not in const_eval.EVALUATORS:
            raise ConfigError(f"fold_constants: evaluator must be one of {const_eval.EVALUATORS}")
        if self.max_output_bytes <= 0 or self.max_growth <= 0:
            raise ConfigError("fold_constants: max_output_bytes and max_growth must be positive")
        object.__setattr__(self, "keep_ops", tuple(self.keep_ops))


class FoldConstantsPass(ShrinkPass):
    """Fold constant subexpressions and static shape computations (see module rules)."""

    name = "fold_constants"
    Config = FoldConstantsConfig
    changes = Changes.TOPOLOGY | Changes.WEIGHTS

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        folder = _Folder(model, self.config, stats)
        for _ in range(_MAX_ROUNDS):
            _shape_info.fill_missing(model, shape_values.shape_inputs(model))
            shape_folds = stats.counts["reshape_shapes_folded"] + stats.counts["shape_ops_folded"]
            folder.fold_graph(model.graph, model.opset_imports)
            # A folded Reshape shape can make the shapes after it known, and with them more shape
            # computations static: infer again (only when something is stale) and sweep again.
            if stats.counts["reshape_shapes_folded"] + stats.counts["shape_ops_folded"] == shape_folds:
                break
            if not _shape_info.any_stale(model):
                break
        for function in model.functions.values():
            folder.fold_graph(function, {**model.opset_imports, **function.opset_imports})
        stats.notes["evaluations"] = folder.evaluator.count


class _Folder:
    def __init__(self, model: ir.Model, config: FoldConstantsConfig, stats: PassStats) -> None:
        self.model, self.config, self.stats = model, config, stats
        self.evaluator = const_eval.NodeEvaluator(config.evaluator)
        self.shapes: dict[ir.Value, shape_values.ShapeValue] = {}
        self.created: set[ir.Value] = set()  # constants this run made, dropped again once unused
        self._names: NameGen | None = None
        self._all_names: collections.Counter | None = None

    def fold_graph(self, graph, opsets: dict[str, int]) -> None:
        for node in list(graph):
            if node.graph is None:  # removed while folding an earlier node
                continue
            subs = subgraphs_of(node)
            if not subs:
                self._visit(node, graph, opsets)
                continue
            for sub in subs:
                self.fold_graph(sub, opsets)
            if node.op_type == "If" and is_default_domain(node) and self.config.inline_if:
                for added in self._try_inline_if(node, graph):
                    self._visit(added, graph, opsets)

    def _visit(self, node: ir.Node, graph, opsets: dict[str, int]) -> None:
        if node.op_type == "Constant" and is_default_domain(node):
            if self.config.constants_to_initializers and isinstance(graph, ir.Graph):
                self._to_initializer(node, graph)
            return
        if not all(v is None or is_constant(v) for v in node.inputs):
            self._fold_shapes(node, graph)
        elif any(o.uses() or o.is_graph_output() for o in node.outputs):
            self._fold_node(node, graph, opsets)

    def _to_initializer(self, node: ir.Node, graph: ir.Graph) -> None:
        """Rule 0: a Constant node of a graph becomes an initializer of the same name."""
        out = node.outputs[0]
        if out.is_graph_output():
            return
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            tensor = attr.as_tensor()
        else:
            array = const_array(out)
            if array is None:  # sparse or string-list values stay Constant nodes
                return
            tensor = ir.tensor(array)
        name = out.name or self.names(f"{node.name or 'Constant'}_value")
        out.name = None
        tensor.name = name
        new = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
        new.const_value = tensor
        graph.register_initializer(new)
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        self.created.add(new)
        self.stats.add("constants_to_initializers")

    # ------------------------------------------------------------ rule 1: evaluate
    def _fold_node(self, node: ir.Node, graph, opsets: dict[str, int]) -> None:
        in_bytes = sum(_constant_nbytes(v) for v in node.inputs if v is not None)
        reason = refusal(node, self.config.keep_ops) or self._storage_refusal(node)
        if reason is None and in_bytes > self.config.max_input_bytes:
            reason = f"its inputs hold {in_bytes} bytes > max_input_bytes={self.config.max_input_bytes}"
        if reason is not None:
            self.stats.skip(node, reason)
            return
        arrays = [None if v is None else const_array(v) for v in node.inputs]
        if any(a is None and v is not None for a, v in zip(arrays, node.inputs)):
            self.stats.skip(node, "an input's dtype has no numpy equivalent")
            return
        reason = self._size_refusal(node, arrays, predicted_bytes(node, arrays))
        if reason is not None:
            self.stats.skip(node, reason)
            return
        version = node.version or opsets.get("", opsets.get("ai.onnx", onnx.defs.onnx_opset_version()))
        try:
            outputs = self.evaluator.run(node, arrays, version)
        except const_eval.EvaluationError as e:
            self.stats.skip(node, f"could not evaluate: {e}")
            return
        reason = self._size_refusal(node, arrays, sum(a.nbytes for a in outputs))
        reason = reason or _disagreement(node, outputs)
        if reason is not None:
            self.stats.skip(node, reason)
            return
        for old, array in zip(node.outputs, outputs):
            if old.uses() or old.is_graph_output():
                self._materialize(graph, node, old, array)
        self._remove(node)
        self.stats.add("nodes_folded")

    def _storage_refusal(self, node: ir.Node) -> str | None:
        cfg = self.config
        if not (cfg.keep_float16_storage and node.op_type == "Cast" and is_default_domain(node)):
            return None
        x, to = node.inputs[0], node.attributes.get("to")
        if x is None or x.dtype != ir.DataType.FLOAT16 or to is None or to.as_int() != ir.DataType.FLOAT:
            return None
        if 2 * _constant_nbytes(x) <= cfg.small_output_bytes:  # the float32 copy folding would make
            return None
        return ("the model stores this weight as float16 (keep_float16_storage): folding the Cast would "
                "double its bytes; ONNX Runtime folds it when it loads the model")

    def _size_refusal(self, node: ir.Node, arrays: list, out_bytes: int | None) -> str | None:
        cfg = self.config
        if out_bytes is None:
            return None
        if out_bytes > cfg.max_output_bytes:
            return f"its output would hold {out_bytes} bytes > max_output_bytes={cfg.max_output_bytes}"
        freed = sum(self._freed_share(v, node, a) for v, a in zip(node.inputs, arrays) if a is not None)
        if out_bytes > cfg.small_output_bytes and out_bytes > cfg.max_growth * freed:
            return (
                f"its output would hold {out_bytes} bytes, more than max_growth={cfg.max_growth} times "
                f"the {int(freed)} input bytes folding frees"
            )
        return None

    def _freed_share(self, value: ir.Value, node: ir.Node, array: np.ndarray) -> float:
        """Bytes of constant input ``value`` that folding ``node`` frees: all of them when ``node`` is
        its only user, an equal share when every user can be folded too (the four Slices of one LSTM
        weight), else none (folding would copy a weight that stays)."""
        if value.is_graph_output() or value.is_graph_input():
            return 0
        users = {id(user): user for user, _ in value.uses()}
        if all(user is node for user in users.values()):
            return array.nbytes
        if all(self._foldable(user) for user in users.values()):
            return array.nbytes / len(users)
        return 0

    def _foldable(self, node: ir.Node) -> bool:
        return (
            refusal(node, self.config.keep_ops) is None
            and not subgraphs_of(node)
            and all(v is None or is_constant(v) for v in node.inputs)
        )

    def _materialize(self, graph, anchor: ir.Node, old: ir.Value, array: np.ndarray) -> ir.Value:
        """A constant holding ``array`` takes the place (uses, graph outputs, name) of ``old``."""
        name = old.name or self.names(f"{anchor.name or anchor.op_type}_folded")
        old.name = None
        tensor = ir.tensor(np.require(array, requirements="C"), name=name)
        if isinstance(graph, ir.Graph) and not old.is_graph_output():
            new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
            new.const_value = tensor
            graph.register_initializer(new)
        else:
            const = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", tensor)])
            new = const.outputs[0]
            new.name = name
            new.type = own_type(old) or ir.TensorType(tensor.dtype)
            new.shape = old.shape if old.is_graph_output() and old.shape else ir.Shape(array.shape)
            new.const_value = tensor
            graph.insert_before(anchor, const)
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        self.created.add(new)
        self.stats.add("bytes_created", array.nbytes)
        return new

    def _remove(self, node: ir.Node) -> None:
        """Remove a folded node, and the constants this run made that only it read."""
        inputs = [v for v in node.inputs if v is not None and v in self.created]
        node.graph.remove(node, safe=True)
        for value in inputs:
            if value.uses() or value.is_graph_output():
                continue
            self.created.discard(value)
            if value.is_initializer():
                value.graph.initializers.pop(value.name)
            elif value.producer() is not None:
                value.producer().graph.remove(value.producer(), safe=True)

    def names(self, hint: str) -> str:
        if self._names is None:
            self._names = NameGen(self.model)
        return self._names(hint)

    # ------------------------------------------------------------ rule 2: static shapes
    def _fold_shapes(self, node: ir.Node, graph) -> None:
        target = shape_values.reshape_target(node, self._lookup, self.config.trust_dim_params)
        if target is not None:
            const = self._materialize_input(graph, node, target)
            node.replace_input_with(1, const)
            self.stats.add("reshape_shapes_folded")
            return
        sv = shape_values.infer(node, self._lookup)
        if sv is None:
            return
        out = node.outputs[0]
        if not sv.static:
            self.shapes[out] = sv
            return
        if out.dtype is not None and out.dtype != sv.dtype:
            self.stats.skip(node, f"static shape value is {sv.dtype}, the graph says {out.dtype}")
            return
        if not (out.uses() or out.is_graph_output()):
            return
        self._materialize(graph, node, out, sv.array())
        self._remove(node)
        self.stats.add("shape_ops_folded")

    def _lookup(self, value: ir.Value) -> shape_values.ShapeValue | None:
        sv = self.shapes.get(value)
        return sv if sv is not None else shape_values.from_constant(value)

    def _materialize_input(self, graph, node: ir.Node, array: np.ndarray) -> ir.Value:
        name = self.names(f"{node.name or node.op_type}_shape")
        tensor = ir.tensor(array, name=name)
        if isinstance(graph, ir.Graph):
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
            value.const_value = tensor
            graph.register_initializer(value)
            return value
        const = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", tensor)])
        const.outputs[0].name = name
        graph.insert_before(node, const)
        return const.outputs[0]

    # ------------------------------------------------------------ rule 3: If with a constant condition
    def _try_inline_if(self, node: ir.Node, graph) -> list[ir.Node]:
        """Inline the taken branch; returns the Identity nodes added for graph outputs."""
        cond = const_array(node.inputs[0]) if node.inputs else None
        if cond is None or cond.size != 1:
            return []
        attr = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
        branch = node.attributes[attr].as_graph()
        reason = inline_if_refusal(node, graph, branch, self._model_names())
        if reason is not None:
            self.stats.skip(node, reason)
            return []
        added = _inline_branch(node, graph, branch)
        self.stats.add("if_inlined")
        return added

    def _model_names(self) -> collections.Counter:
        if self._all_names is None:
            self._all_names = collections.Counter()
            graphs = [*self.model.graphs()]
            for fn in self.model.functions.values():
                graphs.extend([fn, *fn.subgraphs()])
            for g in graphs:
                self._all_names.update(defined_names(g))
        return self._all_names


def _inline_branch(node: ir.Node, graph, branch: ir.Graph) -> list[ir.Node]:
    """Move ``branch``'s nodes and initializers before ``node`` and route its outputs to them."""
    added = []
    results = list(branch.outputs)
    branch.outputs.clear()
    for inner in list(branch):
        branch.remove(inner)
        graph.insert_before(node, inner)
    for value in list(branch.initializers.values()):
        branch.initializers.pop(value.name)
        graph.register_initializer(value)
    for out, res in zip(node.outputs, results):
        if res.type is None:
            res.type = own_type(out)
        if res.shape is None:
            res.shape = out.shape
        if not out.is_graph_output():
            out.replace_all_uses_with(res)
        elif res.producer() is not None and res.graph is graph and not res.is_graph_output():
            name, out.name = out.name, None
            res.name = name
            res.type, res.shape = out.type or res.type, out.shape or res.shape
            out.replace_all_uses_with(res, replace_graph_outputs=True)
        else:
            ident = ir.Node("", "Identity", [res])
            ident.outputs[0].name, out.name = out.name, None
            ident.outputs[0].type, ident.outputs[0].shape = out.type, out.shape
            graph.insert_before(node, ident)
            out.replace_all_uses_with(ident.outputs[0], replace_graph_outputs=True)
            added.append(ident)
    drop_node(node)
    return added




def _constant_nbytes(value: ir.Value) -> int:
    if value.const_value is not None:
        return value.const_value.nbytes
    attr = value.producer().attributes.get("value")
    return attr.as_tensor().nbytes if attr is not None and attr.type == ir.AttributeType.TENSOR else 8


def _disagreement(node: ir.Node, outputs: list[np.ndarray]) -> str | None:
    for old, array in zip(node.outputs, outputs):
        try:
            dtype = ir.DataType.from_numpy(array.dtype)
        except TypeError:
            return f"the evaluator returned an unsupported dtype {array.dtype}"
        if old.dtype is not None and old.dtype != dtype:
            return f"the evaluator returned {dtype.name}, the graph says {old.dtype.name}"
        if old.shape is not None and old.shape.is_static() and tuple(old.shape) != array.shape:
            return f"the evaluator returned shape {array.shape}, the graph says {tuple(old.shape)}"
    return None
