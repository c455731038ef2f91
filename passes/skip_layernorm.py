"""``avoid_skip_layernorm``: an ``Add`` that ONNX Runtime would fuse into ``SkipLayerNormalization`` becomes ``Sum``.

ONNX Runtime (graph optimization level ``extended`` and above, so by default) fuses ``Add ->
LayerNormalization`` into its contrib ``SkipLayerNormalization`` when the Add's two inputs are 3-D with
the same static dims (the first may be the same symbolic dim), the Add's output feeds only the
LayerNormalization and is not a graph output (``core/optimizer/skip_layer_norm_fusion.cc``). Its CPU
kernel is a scalar loop that divides per element, and in ONNX Runtime 1.32 (AMD EPYC, 1 thread) it ran
slower than the ops it replaces: the Sum form took 0.16-0.76 of the fused time on ``Add ->
LayerNormalization`` alone and 0.41-0.81 with the projection's ``MatMul + bias`` before it, batch x
tokens x hidden from 1x17x64 to 8x128x768; the trained digits ViT (batch 64) and the zoo transformer,
whose last residual ``Add`` ONNX Runtime fuses once the default preset has folded the exported shape
computations, ran in 0.93 of the time with the rule than without it (``benchmarks/bench_fusions_ort.py``,
``results/fusions_ort.md``; with ORT's optimizations off both forms cost the same). ``Sum`` of two
same-shaped tensors computes what ``Add`` does, and ONNX Runtime's fusion matches ``Add`` only.

Rule [adds_as_sum]: a default-domain ``Add`` whose output is read only by input 0 of a default-domain
``LayerNormalization`` (same graph) and is not a graph output, whose inputs are float32, float16 or
bfloat16 with inferred 3-D shapes that ONNX Runtime's check accepts, becomes ``Sum`` (same node, same
inputs and outputs). Not rewritten: any other ``Add`` (a residual ``Add`` that the next block reads too
never fuses), inputs of unknown or different shapes. Runs in the ``default`` preset only
(``pipeline.FLOAT_FUSION_PASSES``). The CUDA kernel of SkipLayerNormalization is another one, not
measured here (no GPU); a model for the CUDA provider can leave the rule out (``--passes``, a recipe).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxshrink.passes import _shape_info
from onnxshrink.passes._fusion_base import Rewriter, run, sole_user

from onnxshrink.graph_utils import is_default_domain
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass

#: The dtypes ONNX Runtime's fusion accepts (``IsSupportedDataType``).
_FUSED_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclasses.dataclass(frozen=True)
class AvoidSkipLayerNormConfig:
    #: Run onnx shape inference first when an input of a candidate Add lacks its shape.
    infer_shapes: bool = True


def _layernorm_reader(add: ir.Node) -> ir.Node | None:
    out = add.outputs[0]
    users = [u.node for u in out.uses()]
    if len(users) != 1 or len(add.outputs) != 1:
        return None
    ln = users[0]
    if ln.op_type != "LayerNormalization" or not is_default_domain(ln) or ln.graph is not add.graph:
        return None
    return ln if sole_user(out, ln) and ln.inputs[0] is out and list(ln.inputs).count(out) == 1 else None


def fusable_shapes(a: ir.Value | None, b: ir.Value | None) -> bool:
    """ONNX Runtime's ``CheckFirstAdd``: both 3-D, every dim the same number, except that the first may
    be the same symbolic name in both."""
    if a is None or b is None or a.shape is None or b.shape is None or len(a.shape) != 3 or len(b.shape) != 3:
        return False
    for i, (x, y) in enumerate(zip(a.shape, b.shape)):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif i != 0 or isinstance(x, int) or isinstance(y, int) or x.value is None or x.value != y.value:
            return False
    return True


def _try_add(rw: Rewriter, node: ir.Node) -> bool:
    if len(node.inputs) != 2 or _layernorm_reader(node) is None:
        return False
    a, b = node.inputs
    if any(v is None or v.dtype not in _FUSED_TYPES for v in (a, b)) or not fusable_shapes(a, b):
        return False
    node.op_type = "Sum"
    node.version = None
    rw.stats.add("adds_as_sum")
    return True


def candidates(model: ir.Model) -> list[ir.Value]:
    """Inputs of the Adds the rule looks at (their shapes decide it)."""
    return [v for g in model.graphs() for n in g if n.op_type == "Add" and _layernorm_reader(n) is not None
            for v in n.inputs]


class AvoidSkipLayerNormPass(ShrinkPass):
    """Write an ``Add -> LayerNormalization`` that ONNX Runtime would fuse (slower on CPU) as ``Sum``."""

    name = "avoid_skip_layernorm"
    Config = AvoidSkipLayerNormConfig
    changes = Changes.TOPOLOGY

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        if self.config.infer_shapes:
            _shape_info.fill_missing(model, candidates(model))
        run(model, stats, ("Add",), _try_add)
