"""Fill in missing dtypes and shapes of intermediate values with onnx shape inference.

Rules that must prove a node is a no-op (a Cast to the same type, a Reshape to the same shape) need the
dtype and shape of its input; exported models often carry no ``value_info`` for intermediate values.
``fill_missing`` runs onnx's (non-strict) shape inference on a copy of the model with the big initializers
lifted out and copies back only what was missing or less precise. Graph inputs, outputs and
initializers are never touched, so the interface cannot change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx
import onnx_ir as ir

from onnxshrink.checks import lifted_proto

logger = logging.getLogger(__name__)


def lacks_info(value: ir.Value | None) -> bool:
    """Whether ``value`` misses its dtype or its shape (symbolic dimensions count as known)."""
    return value is not None and (value.dtype is None or value.shape is None)


def fill_missing(model: ir.Model, wanted: Iterable[ir.Value | None] = ()) -> int:
    """Infer shapes when any ``wanted`` value of the main graph (or its subgraphs) lacks information.

    Returns how many values gained information. Inference failures are logged and ignored: the rules
    that need the information then simply do not fire.
    """
    main_graphs = set(model.graphs())
    if not any(lacks_info(v) and v.graph in main_graphs for v in wanted):
        return 0
    try:
        with lifted_proto(model) as proto:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                                         data_prop=True)
        inferred_model = ir.serde.deserialize_model(inferred)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        logger.info("shape inference failed, rules needing shapes may not fire: %s", e)
        return 0
    filled = 0
    for graph, inferred_graph in zip(model.graphs(), inferred_model.graphs()):
        if len(graph) != len(inferred_graph):
            continue  # the graphs do not line up; never guess
        for node, other in zip(graph, inferred_graph):
            if node.op_type != other.op_type or len(other.outputs) != len(node.outputs):
                break
            for value, source in zip(node.outputs, other.outputs):
                filled += _merge(value, source)
    logger.debug("shape inference filled %d values", filled)
    return filled


def _merge(value: ir.Value, source: ir.Value) -> int:
    if value.is_graph_output():
        return 0
    changed = 0
    if value.dtype is None and source.dtype is not None:
        value.dtype = source.dtype
        changed = 1
    new = source.shape
    if new is None:
        return changed
    old = value.shape
    if old is None:
        value.shape = ir.Shape(list(new))
        return 1
    if len(old) != len(new):
        return changed
    merged = [o if isinstance(o, int) or not isinstance(n, int) else n for o, n in zip(old, new)]
    if merged != list(old):
        value.shape = ir.Shape(merged)
        changed = 1
    return changed
