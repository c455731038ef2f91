"""Check what ONNX Runtime's CPU EP made of a QDQ model: which node units fused, which did not.

``fusion_report(path)`` opens the model in ONNX Runtime (CPU EP, ``ORT_ENABLE_EXTENDED``: the level that
runs the QDQ fusions) with ``optimized_model_filepath`` set, then reads the optimized model it saved:

- ``unfused``: a node of a type ORT fuses (Conv, MatMul, Gemm, Add, Mul, Concat, pools, Sigmoid, LeakyRelu,
  and the data-movement ops whose Q/DQ it drops) still running in float although every non-constant
  input comes from a DequantizeLinear: a node unit that should have fused and did not. A node with a
  float constant operand (an Add of a bias the planner kept float) is float by design and not listed.
- ``roundtrips``: a QuantizeLinear feeding a DequantizeLinear directly: int8 conversion that only costs.

The report is true (``bool(report)``) when both lists are empty.

``already_quantized(model)`` counts the nodes of an ``ir.Model`` that already compute on integers.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxshrink import runtime

#: Default-domain ops the CPU EP runs quantized when all their inputs come from DQ.
FUSABLE = frozenset({
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid",
    "LeakyRelu", "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Split", "Resize", "Expand", "Tile",
})


@dataclasses.dataclass
class FusionReport:
    ops: dict[str, int]
    unfused: list[str]
    roundtrips: list[str]

    def __bool__(self) -> bool:
        return not self.unfused and not self.roundtrips

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"ORT optimized graph: {sum(self.ops.values())} nodes"]
        lines += [f"  unfused: {u}" for u in self.unfused]
        lines += [f"  Q->DQ round trip: {r}" for r in self.roundtrips]
        return "\n".join(lines if not self else [*lines, "  every QDQ node unit fused"])


def fusion_report(path: str | os.PathLike, providers=None) -> FusionReport:
    """Fusion report of the model at ``path`` (see the module docstring)."""
    rt = runtime.ort()
    with tempfile.TemporaryDirectory(prefix="onnxshrink-fusion-") as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        so = runtime.session_options(
            threads=1, optimized_path=opt_path, level=rt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        )
        runtime.make_session(str(path), providers or ["CPUExecutionProvider"], options=so)
        optimized = onnx.load(str(opt_path), load_external_data=False)
    return inspect_optimized(optimized)


def inspect_optimized(model: onnx.ModelProto) -> FusionReport:
    ops: collections.Counter = collections.Counter()
    unfused: list[str] = []
    roundtrips: list[str] = []
    for graph in _graphs(model.graph):
        _inspect_graph(graph, ops, unfused, roundtrips)
    return FusionReport(dict(sorted(ops.items())), unfused, roundtrips)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _inspect_graph(graph, ops, unfused: list[str], roundtrips: list[str]) -> None:
    producer = {out: n for n in graph.node for out in n.output}
    consts = {t.name: t.data_type for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            consts[n.output[0]] = value.data_type if value is not None else onnx.TensorProto.FLOAT
    for node in graph.node:
        default = node.domain in ("", "ai.onnx")
        ops[node.op_type if default else f"{node.domain}.{node.op_type}"] += 1
        if not default:
            continue
        if node.op_type == "DequantizeLinear":
            src = producer.get(node.input[0])
            if src is not None and src.op_type == "QuantizeLinear":
                roundtrips.append(f"{src.name!r} -> {node.name!r} ({node.input[0]})")
            continue
        if node.op_type not in FUSABLE:
            continue
        if any(consts.get(x) == onnx.TensorProto.FLOAT for x in node.input):
            continue  # a float constant operand: kept float on purpose (else it would come from a DQ)
        data = [x for x in node.input if x and x not in consts]
        from_dq = [x for x in data if producer.get(x) is not None and producer[x].op_type == "DequantizeLinear"]
        if from_dq and len(from_dq) == len(data):
            unfused.append(f"{node.op_type} {node.name!r} still float, fed by DequantizeLinear of {from_dq}")


#: Ops that already compute on integers (a quantized model's kernels, QDQ or operator-oriented).
QUANTIZED_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax", "DynamicQuantizeLSTM", "QAttention",
})


def already_quantized(model: ir.Model) -> dict[str, int]:
    """Op type -> count of the nodes of ``model`` (subgraphs too) that already hold quantized compute:
    integer kernels (``QUANTIZED_OPS``, any domain) and ``DequantizeLinear`` of a constant (a QDQ model's
    int8 weights). Empty for a float model."""
    out: dict[str, int] = {}
    for graph in model.graphs():
        for node in graph:
            const_dq = node.op_type == "DequantizeLinear" and node.inputs and node.inputs[0] is not None \
                and node.inputs[0].const_value is not None
            if node.op_type in QUANTIZED_OPS or const_dq:
                key = "DequantizeLinear (constant)" if const_dq else node.op_type
                out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))
