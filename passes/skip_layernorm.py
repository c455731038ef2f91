"""``avoid_skip_layernorm``: an ``Add`` that ONNX Runtime would fuse into ``SkipLayerNormalization`` becomes ``Sum``.

ONNX Runtime (graph optimization level ``extended`` and above, so by default) fuses ``Add ->
LayerNormalization`` into its contrib ``SkipLayerNormalization`` when the Add's two inputs are 3-D with
the same static dims (the first may be the same symbolic dim), the Add's output feeds only the
LayerNormalization and is not a graph output (``core/optimizer/skip_layer_norm_fusion.cc``). Its CPU
kernel is a scalar loop that divides per element, and in ONNX Runtime 1.32 (AMD EPYC, 1 thread) it ran
slower than the ops it replaces: the Sum form took 0.17-0.75 of the fused time on ``Add ->
LayerNormalization`` alone (the same into a written-out layer norm at opset 14) and 0.41-0.81 with the
projection's ``MatMul + bias`` before it, batch x tokens x hidden from 1x17x64 to 8x128x768; the
trained digits ViT (batch 64) and the zoo transformer, whose last residual ``Add`` ONNX Runtime fuses
once the default preset has folded the exported shape computations, ran in 0.93 of the time with the
rule than without it, PP-OCR rec v4/v6 (one such Add, on a small tensor) in 0.99-1.0
(``benchmarks/bench_fusions_ort.py``, ``results/fusions_ort.md``; with ORT's optimizations off both
forms cost the same). ``Sum`` of two same-shaped tensors computes what ``Add`` does, and ONNX Runtime's
fusion matches ``Add`` only.

Rule [adds_as_sum]: a default-domain ``Add`` whose output is read only by input 0 of a default-domain
``LayerNormalization`` (same graph), or only by the ReduceMean and Sub of a written-out layer norm
(``fuse_layernorm``'s pattern, at any opset: ONNX Runtime's own LayerNormFusion makes it one first),
and is not a graph output, whose inputs are float32, float16 or bfloat16 and may be 3-D with the same
dims (``fusable_shapes``), becomes ``Sum`` (same node, same inputs and outputs). Not rewritten: any
other ``Add`` (a residual ``Add`` that the next block reads too never fuses), inputs of another rank,
of different sizes, or broadcast. Runs in the ``default`` preset (``pipeline.FLOAT_FUSION_PASSES``),
after pruning (``pipeline.after_prune_steps``) and in the int8 build (``qdq_tune.steps``). The CUDA
kernel of SkipLayerNormalization is another one, not measured here (no GPU); a model for the CUDA
provider can leave the rule out (``--passes``, a recipe).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxshrink.passes import _shape_info
from onnxshrink.passes._fusion_base import Rewriter, candidates, run
from onnxshrink.passes.layernorm import match_layernorm

from onnxshrink.graph_utils import is_default_domain
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass

#: The dtypes ONNX Runtime's fusion accepts (``IsSupportedDataType``).
_FUSED_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclasses.dataclass(frozen=True)
class AvoidSkipLayerNormConfig:
    #: Run onnx shape inference first when an input of a candidate Add lacks its shape.
    infer_shapes: bool = True


def _layernorm_reader(add: ir.Node) -> ir.Node | None:
    """The LayerNormalization that alone reads ``add``'s output (as x), or the Div of a written-out one
    whose mean and centring alone read it (ONNX Runtime fuses that into LayerNormalization first)."""
    out = add.outputs[0]
    users = [u.node for u in out.uses()]
    if not users or len(add.outputs) != 1 or out.is_graph_output() or any(u.graph is not add.graph for u in users):
        return None
    ln = users[0]
    if len(users) == 1 and ln.op_type == "LayerNormalization" and is_default_domain(ln):
        return ln if [u.idx for u in out.uses()] == [0] else None  # x only, not the scale or bias
    return _written_out_reader(out, users)


def _written_out_reader(x: ir.Value, users: list[ir.Node]) -> ir.Node | None:
    """The Div of the written-out layer norm (``layernorm.match_layernorm``) whose ReduceMean and Sub are
    the only readers of ``x``."""
    for sub in users:
        if sub.op_type != "Sub" or sub.inputs[0] is not x:
            continue
        for use in sub.outputs[0].uses():
            found = match_layernorm(use.node) if use.node.op_type == "Div" else None
            if found is not None and found["x"] is x and all(any(u is n for n in found["inner"]) for u in users):
                return use.node
    return None


def fusable_shapes(a: ir.Value | None, b: ir.Value | None) -> bool:
    """Whether ONNX Runtime may find both inputs 3-D and of the same dims (its ``CheckFirstAdd``). It
    infers shapes after folding constants itself, so it can know dims that onnx's inference left
    symbolic (PP-OCR rec's sequence length): only a rank other than 3, two different numbers, or a 1
    against another dim (broadcasting) rule the fusion out; an unknown shape does not."""
    for v in (a, b):
        if v is None or (v.shape is not None and len(v.shape) != 3):
            return False
    if a.shape is None or b.shape is None:
        return True
    for x, y in zip(a.shape, b.shape):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            return False
        if (x == 1) != (y == 1):
            return False
    return True


def _try_add(rw: Rewriter, node: ir.Node) -> bool:
    if len(node.inputs) != 2 or _layernorm_reader(node) is None:
        return False
    a, b = node.inputs
    dtypes = {v.dtype for v in (a, b) if v is not None and v.dtype is not None}
    if not dtypes or not dtypes <= set(_FUSED_TYPES) or not fusable_shapes(a, b):
        return False
    node.op_type = "Sum"
    node.version = None
    rw.stats.add("adds_as_sum")
    return True


class AvoidSkipLayerNormPass(ShrinkPass):
    """Write an ``Add -> LayerNormalization`` that ONNX Runtime would fuse (slower on CPU) as ``Sum``."""

    name = "avoid_skip_layernorm"
    Config = AvoidSkipLayerNormConfig
    changes = Changes.TOPOLOGY

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        if self.config.infer_shapes:
            # the inputs of Adds read by a layer norm (their shapes decide), and a written-out one's x
            wanted = [*candidates(model, "LayerNormalization", ("Add",)), *candidates(model, "ReduceMean", ("Add",))]
            _shape_info.fill_missing(model, wanted)
        run(model, stats, ("Add",), _try_add)
