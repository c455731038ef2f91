"""Model fingerprints for caches: a hash of the graph structure and of the initializers.

Walks every graph (subgraphs included) and function: opsets, graph inputs/outputs (name, dtype, shape),
nodes (domain, op, inputs, outputs, attributes), initializers. In-memory tensors are hashed by their bytes,
read through a memoryview (no copy); external tensors by file name, offset, length and the file's size and
modification time, so a multi-GB model is fingerprinted without reading its weights.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx_ir as ir


def model_fingerprint(model: ir.Model) -> str:
    h = hashlib.sha256()
    h.update(repr(sorted(model.opset_imports.items())).encode())
    for graph in model.graphs():
        _graph(h, graph)
    for fn in model.functions.values():
        h.update(f"function {fn.domain}:{fn.name}:{fn.overload}".encode())
        h.update(repr([v.name for v in fn.inputs] + [v.name for v in fn.outputs]).encode())
        for node in fn:
            _node(h, node)
    return h.hexdigest()[:24]


def _value(v: ir.Value | None) -> str:
    if v is None:
        return "-"
    return f"{v.name}:{v.dtype}:{v.shape}"


def _graph(h, graph: ir.Graph) -> None:
    h.update(b"graph")
    h.update(repr([_value(v) for v in graph.inputs]).encode())
    h.update(repr([_value(v) for v in graph.outputs]).encode())
    for v in graph.initializers.values():
        h.update(f"init {_value(v)}".encode())
        if v.const_value is not None:
            _tensor(h, v.const_value)
    for node in graph:
        _node(h, node)


def _node(h, node: ir.Node) -> None:
    ins = [v.name if v is not None else "" for v in node.inputs]
    outs = [v.name for v in node.outputs]
    h.update(f"node {node.domain}:{node.op_type}:{node.overload} {ins} {outs}".encode())
    for name, attr in sorted(node.attributes.items()):
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            h.update(f"attr {name} graph".encode())  # the subgraph itself is hashed by model.graphs()
        elif attr.type == ir.AttributeType.TENSOR:
            h.update(f"attr {name} tensor".encode())
            _tensor(h, attr.value)
        elif attr.type == ir.AttributeType.TENSORS:
            for t in attr.value:
                _tensor(h, t)
        else:
            h.update(f"attr {name} {attr.type} {attr.value!r}".encode())


def _tensor(h, tensor) -> None:
    h.update(f"{tensor.dtype}:{tensor.shape}".encode())
    if isinstance(tensor, ir.ExternalTensor):
        path = os.path.join(tensor.base_dir, tensor.location)
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"external {tensor.location}:{tensor.offset}:{tensor.length}:{stamp}".encode())
        return
    try:
        array = tensor.numpy()
    except Exception:  # noqa: BLE001 - dtypes numpy cannot hold: hash the serialized bytes
        h.update(tensor.tobytes())
        return
    array = np.ascontiguousarray(array)
    if not array.size:
        return
    try:
        h.update(memoryview(array).cast("B"))
    except (ValueError, TypeError):  # ml_dtypes (bfloat16, int4, float8) have no buffer format: their bytes
        h.update(array.view(np.uint8).reshape(-1))
