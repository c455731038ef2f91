"""onnxshrink: an ONNX graph-rewriting optimizer built on onnx_ir.

Python API::

    import onnxshrink
    result = onnxshrink.optimize("model.onnx", "model.opt.onnx", preset="default")
    print(result.after["nodes"])

The names below are imported on first use (PEP 562), so ``import onnxshrink`` and the command line
start without loading onnx, onnx_ir or ONNX Runtime.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public name -> (module, attribute); attribute None: the module itself (a callable module).
_LAZY = {
    "OptimizeResult": ("onnxshrink.api", "OptimizeResult"),
    "optimize": ("onnxshrink.api", "optimize"),
    "PruneResult": ("onnxshrink.pruning", "PruneResult"),
    "prune": ("onnxshrink.pruning", "prune"),
    "ShrinkError": ("onnxshrink.errors", "ShrinkError"),
    "load": ("onnxshrink.model_io", "load"),
    "save": ("onnxshrink.model_io", "save"),
    "quantize": ("onnxshrink.quantize", None),  # callable module: onnxshrink.quantize(model, data, output)
    "validate": ("onnxshrink.validate", None),  # callable module: onnxshrink.validate(ref, cand, data)
}

__all__ = ["OptimizeResult", "PruneResult", "ShrinkError", "__version__", "load", "optimize", "prune", "quantize",
           "save", "validate"]  # the names of _LAZY (a test checks they match)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'onnxshrink' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
