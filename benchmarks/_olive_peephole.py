"""Olive's lossless graph cleanup, ``OnnxPeepholeOptimizer`` with its defaults (onnxscript's optimizer,
onnxoptimizer, Reshape fusion), run as a one-pass Olive workflow: the ``olive`` tool of
``bench_lossless.py``. Runs with Olive's own Python (a venv of its own; see ``bench_quantize_anchors.py``)::

    OLIVE_PYTHON benchmarks/_olive_peephole.py SRC.onnx OUT.onnx [--external-data]

Olive writes its cache and outputs under a temporary folder; the optimized model is copied to OUT (with
its external data, saved beside it, when ``--external-data``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main() -> int:
    import onnx
    from olive.workflows import run as olive_run

    src, out = sys.argv[1], Path(sys.argv[2])
    with tempfile.TemporaryDirectory(prefix="olive-peephole-") as tmp:
        olive_run({
            "input_model": {"type": "ONNXModel", "model_path": src},
            "passes": {"peephole": {"type": "OnnxPeepholeOptimizer"}},
            "output_dir": tmp, "cache_dir": str(Path(tmp) / "cache"), "log_severity_level": 3,
            "evaluate_input_model": False,
        })
        found = sorted(p for p in Path(tmp).rglob("*.onnx") if "cache" not in p.relative_to(tmp).parts)
        if not found:
            raise SystemExit(f"Olive wrote no model under {tmp}")
        model = onnx.load(str(found[0]))
        if "--external-data" in sys.argv:
            onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
        else:
            onnx.save(model, str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
