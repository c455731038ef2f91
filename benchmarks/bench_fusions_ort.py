"""Do the newer lossless fusions slow ONNX Runtime down? (CPU, 1 thread, interleaved, ratios)

Each fusion is measured on the models it fires on: the model optimized by the ``default`` preset with
the fusion against the same preset without it (``fuse_activations`` or ``fold_scalar_scales`` left
out; ``fuse_conv_bias`` with ``scale=False``), plus a synthetic hard-swish stack. PP-OCR models for
the first two, the zoo transformer and the trained digits ViT (batch 64) for the last. Both sessions run interleaved (A B A B ...) on the
same feed; the report gives median latencies and the median of the paired ratios with/without
(< 1: the fusion makes ORT faster). Both ORT levels: ``enable_all`` (what users run; ORT fuses
Conv+Mul by itself there) and ``disable_all`` (what the graph alone costs).

    python benchmarks/bench_fusions_ort.py [--rounds 30] [--only ppocr_det,...]

Writes ``benchmarks/results/fusions_ort.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import fetch_real
from onnxshrink import model_io
from onnxshrink.pipeline import FixedPoint, Pipeline, make_pass, preset_steps

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = {"enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def optimized(path, without: str | None = None) -> bytes:
    """The model after the ``default`` preset, optionally without one fusion ("conv_scale": the
    ``scale`` option of ``fuse_conv_bias``, and ``fold_scalar_scales``, which folds scalar ones too)."""
    steps = preset_steps("default")[0].passes
    skip = {without, "fold_scalar_scales"} if without == "conv_scale" else {without}
    names = [p.name for p in steps if p.name not in skip]
    passes = [make_pass(n, **({"scale": without != "conv_scale"} if n == "fuse_conv_bias" else {})) for n in names]
    model = model_io.load(path)
    Pipeline([FixedPoint(passes)]).run(model)
    return model_io.to_bytes(model)


def session(data: bytes, level) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = level
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def measure(a, b, feed, rounds: int) -> tuple[float, float, float]:
    """Median seconds of a and b, and the median of the paired ratios b/a, run interleaved."""
    for _ in range(3):
        a.run(None, feed), b.run(None, feed)
    ta, tb = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a.run(None, feed)
        t1 = time.perf_counter()
        b.run(None, feed)
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb), statistics.median(y / x for x, y in zip(ta, tb))


def synthetic_hardswish(opset: int, fused: bool) -> bytes:
    """Six hard-swish activations on [1, 32, 80, 80], written out or fused by the pass."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("three", 3), ("zero", 0), ("six", 6))]
    nodes, x = [], "x"
    for i in range(6):
        nodes += [helper.make_node("Add", [x, "three"], [f"a{i}"]),
                  helper.make_node("Clip", [f"a{i}", "zero", "six"], [f"c{i}"]),
                  helper.make_node("Mul", [x, f"c{i}"], [f"m{i}"]),
                  helper.make_node("Div", [f"m{i}", "six"], [f"h{i}"]),
                  helper.make_node("Neg", [f"h{i}"], [f"n{i}"])]
        x = f"n{i}"
    shape = [1, 32, 80, 80]
    graph = helper.make_graph(nodes, "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    if not fused:
        return proto.SerializeToString()
    model = model_io.load(proto)
    Pipeline([FixedPoint([make_pass("fuse_activations"), make_pass("dead_code")])]).run(model)
    assert onnx.load_from_string(model_io.to_bytes(model)).graph.node[0].op_type.startswith("Hard")
    return model_io.to_bytes(model)


def cases(only):
    """(label, fusion, without, with, feed) for every measured pair."""
    x = {"x": np.random.default_rng(0).standard_normal((1, 32, 80, 80)).astype(np.float32) * 4}
    for opset in (12, 14):
        yield (f"synthetic x6 opset {opset}", "fuse_activations", synthetic_hardswish(opset, False),
               synthetic_hardswish(opset, True), x)
    for name in fetch_real.REAL:
        if (only and name not in only) or not name.startswith("ppocr"):
            continue
        path = fetch_real.fetch(name)
        feed = fetch_real.example_feeds(name, 1, seed=0)[0]
        full = optimized(path)
        yield name, "fuse_activations", optimized(path, "fuse_activations"), full, feed
        yield name, "conv scales (fuse_conv_bias scale + fold_scalar_scales)", optimized(path, "conv_scale"), full, feed
    for name, path, feed in _attention_models(only):
        yield name, "fold_scalar_scales", optimized(path, "fold_scalar_scales"), optimized(path), feed


def _attention_models(only):
    """(name, path, feed) of the transformer models (zoo transformer, trained digits ViT)."""
    import tempfile

    from models import digits, zoo

    if not only or "transformer" in only:
        path = zoo.save("transformer", tempfile.mkdtemp(prefix="bench-fusions-"))
        from onnxshrink import data

        specs = data.input_specs(model_io.load(path))
        yield "transformer", path, data.random_feed(specs, 0, {d: 8 for s in specs for d in s.dims if isinstance(d, str)})
    if not only or "digits_vit" in only:
        x, _ = digits.model_input("vit", "test")
        yield "digits_vit", digits.trained_path("vit"), {"input": x[:64]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--only", help="comma-separated real model names")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    load = os.getloadavg()[0]
    lines = ["# Lossless fusions on ONNX Runtime: with / without", "",
             (f"Written by `python benchmarks/bench_fusions_ort.py` ({time.strftime('%Y-%m-%d')}), onnxruntime "
             f"{ort.__version__}, CPU, 1 thread, {args.rounds} interleaved rounds, load average {load:.1f} at the "
             "start (the machine is shared). Ratio: median of paired with/without latencies (< 1: faster with)."),
             "", "| model | fusion | ORT level | without ms | with ms | ratio |", "|---|---|---|---:|---:|---:|"]
    for label, fusion, without, with_, feed in cases(only):
        for level_name, level in LEVELS.items():
            ta, tb, ratio = measure(session(without, level), session(with_, level), feed, args.rounds)
            lines.append(f"| {label} | {fusion} | {level_name} | {ta * 1e3:.2f} | {tb * 1e3:.2f} | {ratio:.3f} |")
            print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fusions_ort.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
