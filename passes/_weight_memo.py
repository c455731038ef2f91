"""Int8 weights kept across the builds of one quantization search (``WeightMemo``).

``quantize`` builds the same float model many times (the calibration candidates, the steps of the
mixed-precision search), and every build quantized every weight again. A weight's parameters and codes
depend only on the weight and its encoding (op, axis, 7-bit or pair-safe, Gemm's ``alpha``): what the
candidates change, the activation ranges and bias correction, moves the int32 biases, and a weight's
scales only where its bias would overflow int32 (``fit_weight_scale_to_bias``), so the codes are
matched on the final scales and computed anew where those differ.

The codes are kept read-only in a spill file (``onnxshrink.spill``): every build maps the same pages,
and no anonymous memory holds them. Only the float model's own initializers are remembered, by
identity (a build's clone shares their tensors): a weight that a pass before QDQ rewrote is a new
tensor in every build, quantized as before, and nothing of a build outlives it here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxshrink.spill import Spill


class WeightMemo:
    """Parameters and codes of ``model``'s weights, per encoding; ``hits`` counts codes reused."""

    def __init__(self, model: ir.Model) -> None:
        self._model = model  # holds the tensors, so their ids stay theirs
        self._known = {id(v.const_value) for g in model.graphs() for v in g.initializers.values()
                       if v.const_value is not None}
        self._params: dict[tuple, Any] = {}
        self._codes: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._spill = Spill()
        self.hits = 0

    def key(self, value: ir.Value, *encoding) -> tuple | None:
        """The memo key of ``value``'s tensor with ``encoding``; None for a tensor not of the model."""
        t = value.const_value
        return (id(t), *encoding) if t is not None and id(t) in self._known else None

    def params(self, key: tuple | None, compute: Callable[[], Any]) -> Any:
        """What ``compute()`` returned for ``key`` (the weight's parameters), computed once."""
        if key is None:
            return compute()
        if key not in self._params:
            self._params[key] = compute()
        return self._params[key]

    def codes(self, key: tuple | None, scale: np.ndarray, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The codes remembered for ``key`` when they were made with ``scale``; else ``compute()``'s,
        remembered when ``key`` had none."""
        if key is None:
            return compute()
        kept = self._codes.get(key)
        if kept is not None and np.array_equal(kept[0], scale):
            self.hits += 1
            return kept[1]
        codes = compute()
        if kept is None:
            codes = self._spill(codes)
            codes.flags.writeable = False  # shared by every build: a write in place would change them all
            self._codes[key] = (np.array(scale, copy=True), codes)
        return codes
