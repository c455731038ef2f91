"""Olive's lossless graph cleanup, ``OnnxPeepholeOptimizer`` with its defaults (onnxscript's optimizer,
onnxoptimizer, Reshape fusion), run as a one-pass Olive workflow: the ``olive`` tool of
``bench_lossless.py``. Runs with Olive's own Python (a venv of its own; see ``bench_quantize_anchors.py``)::

    OLIVE_PYTHON benchmarks/_olive_peephole.py SRC.onnx OUT.onnx

The optimized model is copied to OUT with its external data files, as Olive wrote them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _anchor_quantizers import olive_workflow


def main() -> int:
    olive_workflow(sys.argv[1], sys.argv[2], {"peephole": {"type": "OnnxPeepholeOptimizer"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
