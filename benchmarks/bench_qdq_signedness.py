"""uint8 vs int8 activations (U8S8 vs S8S8) for onnxshrink's QDQ output, on ONNX Runtime CPU, 1 thread.

Decides ``quantize.default_activations()``. Each model is quantized twice from the same calibration
table (minmax), once with uint8 (asymmetric) and once with int8 (symmetric) activations, weights int8
per channel both times; the two sessions run interleaved (A B, B A, ...) with ``onnxshrink.bench``, and
the report gives both medians and the paired speed-up of uint8 over int8 (> 1: uint8 is faster), plus
each against float. It also prints the accuracy of both on the digits test split.

    /work/venv/bin/python benchmarks/bench_qdq_signedness.py [--runs 200] [--batch 16] [--out results/]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import digits, zoo
from onnxshrink import bench, model_io
from onnxshrink.quantize import quantize

MODELS = ["digits:cnn", "digits:resnet", "digits:mobilenet", "digits:vit", "zoo:mobilenetv2", "zoo:transformer"]


def _source(spec: str, batch: int):
    kind, name = spec.split(":")
    if kind == "digits":
        calib = digits.feeds(name, "calib", batch=32)
        x, y = digits.model_input(name, "test")
        return digits.trained_path(name), calib, {"input": x[:batch]}, (x, y)
    proto = zoo.build(name)
    ir_model = model_io.load(proto)
    from onnxshrink import data

    specs = data.input_specs(ir_model)
    dims = {d: batch for s in specs for d in s.dims if isinstance(d, str)}
    calib = [data.random_feed(specs, i, {d: 4 for d in dims}) for i in range(16)]
    return proto, calib, data.random_feed(specs, 1000, dims), None


def _accuracy(path, xy) -> float | None:
    if xy is None:
        return None
    from onnxshrink.runtime import make_session

    sess = make_session(str(path), threads=1)
    return digits.accuracy(sess.run(None, {"input": xy[0]})[0], xy[1])


def run(spec: str, runs: int, batch: int, tmp: Path, cache: Path) -> dict:
    src, calib, feed, xy = _source(spec, batch)
    paths = {}
    for act in ("uint8", "int8"):
        paths[act] = tmp / f"{spec.replace(':', '_')}_{act}.onnx"
        quantize(src, calib, paths[act], activations=act, cache_dir=cache, tune=False)  # same placement
    float_path = tmp / f"{spec.replace(':', '_')}_float.onnx"
    model_io.save(model_io.load(src), float_path)
    pair = bench.measure([paths["int8"], paths["uint8"]], [feed], runs=runs, warmup=10,
                         labels=["int8", "uint8"]).providers["cpu"]
    vs_float = {}
    for act in ("uint8", "int8"):
        r = bench.measure([float_path, paths[act]], [feed], runs=max(50, runs // 2), warmup=10).providers["cpu"]
        vs_float[act] = round(r.ratio.speedup, 3)
    return {
        "model": spec,
        "batch": batch,
        "int8_ms": round(pair.models[0].latency.median_ms, 4),
        "uint8_ms": round(pair.models[1].latency.median_ms, 4),
        "uint8_speedup_over_int8": round(pair.ratio.speedup, 3),
        "ci95": [round(pair.ratio.ci_low, 3), round(pair.ratio.ci_high, 3)],
        "speedup_vs_float": vs_float,
        "accuracy": {act: _accuracy(paths[act], xy) for act in ("uint8", "int8")} if xy else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            row = run(spec, args.runs, args.batch, Path(tmp), Path(tmp) / "calib")
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qdq_signedness.json").write_text(json.dumps(rows, indent=1) + "\n")
    speedups = [r["uint8_speedup_over_int8"] for r in rows]
    print(f"uint8 over int8: median speed-up {float(np.median(speedups)):.3f} over {len(rows)} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
