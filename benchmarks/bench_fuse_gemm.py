"""Is ``Gemm(A, B, C)`` faster than ``MatMul(A, B) + C`` on ONNX Runtime (CPU, 1 thread)?

Decides the default of ``fuse_gemm``'s ``matmul_add`` option. Each case is a stack of ``layers`` dense
layers ``x = act(x @ W + b)`` built both ways; the two sessions run interleaved (A B A B ...) and the
report gives median latencies and the median of the paired ratios fused/unfused (< 1: Gemm is faster).
Both ORT optimization levels are measured: with ORT's own optimizations on, ORT fuses MatMul+Add by
itself, so the ratio there should be about 1.

    /work/venv/bin/python benchmarks/bench_fuse_gemm.py [--rounds 200] [--dtype float16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

CASES = [  # (M, K, N, layers)
    (1, 256, 256, 8),
    (16, 512, 512, 4),
    (64, 768, 768, 2),
]


def build(m: int, k: int, n: int, layers: int, fused: bool, dtype=np.float32):
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for i in range(layers):
        w = numpy_helper.from_array(
            rng.standard_normal((k if i == 0 else n, n)).astype(dtype) * 0.05, f"w{i}"
        )
        b = numpy_helper.from_array(rng.standard_normal(n).astype(dtype), f"b{i}")
        inits += [w, b]
        if fused:
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"a{i}"]))
        else:
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]))
        nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"]))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", tp, [m, k])],
        [helper.make_tensor_value_info(x, tp, [m, n])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def session(model, level):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def measure(a, b, feed, rounds: int) -> tuple[float, float, float]:
    """Median seconds of a and b, and the median of the paired ratios b/a, run interleaved."""
    ta, tb = [], []
    for _ in range(10):
        a.run(None, feed), b.run(None, feed)
    for _ in range(rounds):
        t0 = time.perf_counter()
        a.run(None, feed)
        t1 = time.perf_counter()
        b.run(None, feed)
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    ratios = [y / x for x, y in zip(ta, tb)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    levels = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    print(f"onnxruntime {ort.__version__}, {dtype}, 1 thread, {args.rounds} interleaved rounds")
    print(f"{'M,K,N x layers':<22}{'ORT level':<13}{'MatMul+Add us':>14}{'Gemm us':>10}{'Gemm/MatMul':>13}")
    for m, k, n, layers in CASES:
        feed = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(dtype)}
        for label, level in levels.items():
            unfused = session(build(m, k, n, layers, fused=False, dtype=dtype), level)
            fused = session(build(m, k, n, layers, fused=True, dtype=dtype), level)
            ta, tb, ratio = measure(unfused, fused, feed, args.rounds)
            case = f"{m},{k},{n} x{layers}"
            print(f"{case:<22}{label:<13}{ta * 1e6:>14.1f}{tb * 1e6:>10.1f}{ratio:>13.3f}")


if __name__ == "__main__":
    main()
