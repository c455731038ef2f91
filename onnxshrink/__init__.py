"""onnxshrink: an ONNX graph-rewriting optimizer built on onnx_ir.

Python API::

    import onnxshrink
    result = onnxshrink.optimize("model.onnx", "model.opt.onnx", preset="default")
    print(result.after["nodes"])
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxshrink import (
    quantize,  # callable module: onnxshrink.quantize(model, data, output)
    validate,  # callable module: onnxshrink.validate(ref, cand, data) -> DriftReport
)
from onnxshrink.api import OptimizeResult, optimize
from onnxshrink.errors import ShrinkError
from onnxshrink.model_io import load, save
from onnxshrink.pruning import PruneResult, prune

__all__ = [
    "OptimizeResult", "PruneResult", "ShrinkError", "__version__", "load", "optimize", "prune", "quantize",
    "save", "validate",
]
