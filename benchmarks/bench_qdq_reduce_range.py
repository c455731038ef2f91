"""8-bit, 7-bit and pair-safe (``reduce_range``) weights on this CPU: accuracy and drift, ours and ORT's.

Why it matters: on x86 CPUs with AVX2 but without VNNI, ORT's u8 x s8 kernels multiply with
VPMADDUBSW, which adds two u8*s8 products into a saturating int16; with 8-bit weights that sum can
overflow. ORT re-encodes some weights as u8 at session load (``Avx2WeightS8ToU8Transformer``), but in
1.32 neither its NHWC QLinearConv nor QGemm / QLinearMatMul / MatMulInteger get it
(``onnxshrink.ort_int8``). VNNI (VPDPBUSD) accumulates in int32 and never saturates. 7-bit weights
avoid the issue everywhere at the price of one bit of weight precision.

Per trained digits model: onnxshrink's quantize with 8-bit weights (``reduce_range=False``), 7-bit
weights (``True``), pair-safe weights (``True, pair_safe=True``: up to 8 bits, no two neighbours in the
kernel's K order past 128, so nothing clips) and the default (``"auto"``: 7 bits for the op types
``ort_int8.saturating_ops`` finds clipping on this machine), beside ONNX Runtime's ``quantize_static`` (QDQ, U8S8, per channel,
MinMax) with its default ``reduce_range=False`` and with ``True``; digits test accuracy and drift
(1 - cosine of the logits against float). The CPU's flags and the probe's answer head the results.

    python benchmarks/bench_qdq_reduce_range.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_quantize_vs_ort import ort_static
from models import digits
from onnxshrink import ort_int8
from onnxshrink.quantize import quantize
from onnxshrink.runtime import make_session
from onnxshrink.validate import flat_drift, flat_floats

OURS = {"8bit": {"reduce_range": False}, "7bit": {"reduce_range": True},
        "pair_safe": {"reduce_range": True, "pair_safe": True}, "auto": {}}
ORT = {"ort_8bit": False, "ort_7bit": True}


def bench_model(name: str, tmp: Path) -> dict:
    x, y = digits.model_input(name, "test")
    ref = make_session(str(digits.trained_path(name)), threads=1).run(None, {"input": x})[0]
    row = {"model": name, "float_acc": round(digits.accuracy(ref, y), 4)}
    calib = digits.feeds(name, "calib", batch=32)
    paths = {}
    for key, opts in OURS.items():
        paths[key] = tmp / f"{name}_{key}.onnx"
        res = quantize(digits.trained_path(name), calib, paths[key], cache_dir=tmp / "calib", **opts)
        if key == "auto":
            row["auto_7bit_ops"] = list(res.options.reduce_range_ops)
    for key, rr in ORT.items():
        paths[key] = tmp / f"{name}_{key}.onnx"
        ort_static(digits.trained_path(name), paths[key], calib, reduce_range=rr)
    for key, path in paths.items():
        got = make_session(str(path), threads=1).run(None, {"input": x})[0]
        row[f"{key}_acc"] = round(digits.accuracy(got, y), 4)
        row[f"{key}_drift"] = float(f"{flat_drift(flat_floats([ref]), flat_floats([got])):.3g}")
    return row


def to_markdown(cpu: dict, rows: list[dict]) -> str:
    keys = [*OURS, *ORT]
    lines = [
        "# 8-bit, 7-bit and pair-safe weights on this CPU (`benchmarks/bench_qdq_reduce_range.py`)", "",
        (f"CPU: {cpu['machine']}, AVX2 {cpu['avx2']}, AVX-512 {cpu['avx512f']}, VNNI {cpu['vnni']}; ONNX Runtime "
        f"{cpu['ort']}. The probe (`onnxshrink.ort_int8`) finds these int8 kernels clipping 8-bit weights: "
        f"{', '.join(cpu['saturating_ops']) or 'none'}."), "",
        ("Digits test accuracy (%) and drift (1 - cosine of the logits, all test samples) of each int8 model. "
        "onnxshrink: `reduce_range=False` (8-bit), `True` (7-bit), `True, pair_safe=True` (pair-safe) and "
        "the default `auto`; ORT: "
        "`quantize_static` QDQ U8S8 per channel MinMax, `reduce_range` False (its default) and True."), "",
        "| model | float | " + " | ".join(keys) + " | drift " + " | drift ".join(keys) + " |",
        "|---|---|" + "---|" * (2 * len(keys)),
    ]
    for r in rows:
        accs = " | ".join(f"{100 * r[f'{k}_acc']:.1f}" for k in keys)
        drifts = " | ".join(f"{r[f'{k}_drift']:.2g}" for k in keys)
        lines.append(f"| {r['model']} | {100 * r['float_acc']:.1f} | {accs} | {drifts} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    cpu = {**ort_int8.describe_cpu(), "ort": onnxruntime.__version__}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in digits.TRAINED:
            rows.append(bench_model(name, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qdq_reduce_range.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1) + "\n")
    (out / "qdq_reduce_range.md").write_text(to_markdown(cpu, rows))
    print(to_markdown(cpu, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
