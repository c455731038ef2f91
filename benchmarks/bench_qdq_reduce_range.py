"""8-bit vs 7-bit (``reduce_range``) weights: accuracy and drift of onnxshrink's QDQ output.

Why it matters: on x86 CPUs with AVX2 but without VNNI, ORT's u8 x s8 kernels multiply with
VPMADDUBSW, which adds two u8*s8 products into a saturating int16; with 8-bit weights that sum can
overflow. ORT mitigates it at session load (``Avx2WeightS8ToU8Transformer`` re-encodes weights that use
more than 7 bits as u8 for a U8U8 kernel, only on CPUs that need it). VNNI (VPDPBUSD) accumulates in int32
and never saturates. 7-bit weights avoid the issue everywhere at the price of one bit of weight precision.
This script measures that price (digits accuracy, output drift vs float) and, on this CPU, whether ORT's
results differ between the two (saturation would show as a large drift on 8-bit only).

    /work/venv/bin/python benchmarks/bench_qdq_reduce_range.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import digits
from onnxshrink.quantize import quantize
from onnxshrink.runtime import make_session


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _cos(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    flags = _cpu_flags()
    cpu = {"machine": platform.machine(), "avx2": "avx2" in flags,
           "vnni": bool({"avx512_vnni", "avx_vnni"} & flags)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in digits.TRAINED:
            x, y = digits.model_input(name, "test")
            ref = make_session(str(digits.trained_path(name)), threads=1).run(None, {"input": x})[0]
            row = {"model": name, "float_acc": digits.accuracy(ref, y)}
            for rr in (False, True):
                out = Path(tmp) / f"{name}_{int(rr)}.onnx"
                quantize(digits.trained_path(name), digits.feeds(name, "calib", batch=32), out,
                         reduce_range=rr, cache_dir=Path(tmp) / "calib")
                got = make_session(str(out), threads=1).run(None, {"input": x})[0]
                key = "7bit" if rr else "8bit"
                row[f"{key}_acc"] = round(digits.accuracy(got, y), 4)
                row[f"{key}_drift"] = float(f"{1 - _cos(ref, got):.3g}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qdq_reduce_range.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1) + "\n")
    worse = sum(r["7bit_drift"] > r["8bit_drift"] for r in rows)
    print(f"cpu {cpu}; 7-bit weights drift more than 8-bit on {worse}/{len(rows)} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
