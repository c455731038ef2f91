"""Which evaluator should ``fold_constants`` try first: ONNX Runtime or onnx's reference evaluator?

Three measurements, each interleaved A B A B (A = ``onnxruntime`` first, B = ``reference`` first), one
thread, medians, reported as ratios B / A (above 1: ONNX Runtime first is faster):
1. per-node cost on single nodes typical of folding (shape ops, small math, one Conv, one MatMul),
   each case evaluated with a fresh evaluator (no session cache), plus which evaluator fails where;
2. the whole pass on a 2,000-node chain of Adds (the session cache at work);
3. the whole pass on the zoo transformer (shape chains, small weight math).

Run: python benchmarks/bench_fold_evaluators.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxshrink.passes import _const_eval as const_eval

from onnxshrink import model_io
from onnxshrink.pipeline import make_pass

rng = np.random.default_rng(0)


def f(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, np.int64)


CASES = [
    ("Shape", [f(2, 3)], {}),
    ("Gather", [i64(1, 2, 3), i64(0)], {"axis": 0}),
    ("Unsqueeze", [f(3), i64(0)], {}),
    ("Concat", [i64(1), i64(-1)], {"axis": 0}),
    ("Cast", [f(4)], {"to": 10}),
    ("Range", [i64(0)[0], i64(10)[0], i64(2)[0]], {}),
    ("ConstantOfShape", [i64(3, 4)], {}),
    ("Expand", [f(1, 4), i64(3, 4)], {}),
    ("Where", [np.array([True, False]), f(2), f(2)], {}),
    ("Reshape", [f(2, 6), i64(3, 4)], {}),
    ("Slice", [f(10), i64(1), i64(5)], {}),
    ("Squeeze", [f(1, 3), i64(0)], {}),
    ("Transpose", [f(64, 32)], {"perm": [1, 0]}),
    ("Sqrt", [np.abs(f(10))], {}),
    ("MatMul", [f(256, 256), f(256, 256)], {}),
    ("Conv", [f(1, 32, 56, 56), f(32, 32, 3, 3)], {"pads": [1] * 4}),
    ("ReduceSum", [f(4, 5), i64(1)], {}),
    ("Tile", [f(2, 2), i64(2, 3)], {}),
    ("Einsum", [f(3, 4), f(4, 5)], {"equation": "ij,jk->ik"}),
    ("Trilu", [f(4, 4)], {}),
    ("CumSum", [f(5), i64(0)[0]], {}),
    ("NonZero", [f(3, 3)], {}),
    ("Pad", [f(2, 2), i64(1, 1, 1, 1)], {}),
    ("LayerNormalization", [f(2, 8), f(8), f(8)], {}),
    ("Softmax", [f(3, 4)], {}),
    ("Erf", [f(10)], {}),
    ("Gelu", [f(10)], {}),
    ("Equal", [i64(1, 2), i64(1, 3)], {}),
    ("Div", [i64(7), i64(2)], {}),
    ("DFT", [f(1, 8, 1)], {}),
]


def single_node(op, inputs, attrs):
    names = [f"x{k}" for k in range(len(inputs))]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in zip(names, inputs)
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.UNDEFINED, None)],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    return model.graph[0]


def time_case(prefer, node, inputs):
    ev = const_eval.NodeEvaluator(prefer, cache_size=0)
    t0 = time.perf_counter()
    try:
        ev.run(node, inputs, 20)
        ok = True
    except const_eval.EvaluationError:
        ok = False
    return time.perf_counter() - t0, ok


def chain_model(n):
    nodes = [helper.make_node("Add", [f"v{i}", "one"], [f"v{i + 1}"]) for i in range(n)]
    nodes.append(helper.make_node("Add", ["x", f"v{n}"], ["y"]))
    inits = [
        numpy_helper.from_array(np.zeros(4, np.float32), "v0"),
        numpy_helper.from_array(np.ones(4, np.float32), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def time_pass(prefer, proto):
    model = model_io.load(proto)
    t0 = time.perf_counter()
    make_pass("fold_constants", evaluator=prefer)(model)
    return time.perf_counter() - t0


def interleaved(fn, repeats):
    a, b = [], []
    for _ in range(repeats):
        a.append(fn("onnxruntime"))
        b.append(fn("reference"))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    time_case("reference", single_node("Add", [f(2), f(2)], {}), [f(2), f(2)])  # warm imports
    print(f"{'case':20s} {'ort ms':>8s} {'ref ms':>8s}  ratio ref/ort  ort ok  ref ok")
    totals = [0.0, 0.0]
    for op, inputs, attrs in CASES:
        node = single_node(op, inputs, attrs)
        ta, tb, oks = [], [], []
        for _ in range(args.repeats):
            (t, ok_a), (u, ok_b) = (
                time_case("onnxruntime", node, inputs),
                time_case("reference", node, inputs),
            )
            ta.append(t)
            tb.append(u)
            oks = [ok_a, ok_b]
        ma, mb = statistics.median(ta), statistics.median(tb)
        totals[0] += ma
        totals[1] += mb
        print(f"{op:20s} {ma * 1e3:8.3f} {mb * 1e3:8.3f}  {mb / ma:13.2f}  {oks[0]!s:6s}  {oks[1]!s:6s}")
    print(
        f"{'sum of medians':20s} {totals[0] * 1e3:8.2f} {totals[1] * 1e3:8.2f}  {totals[1] / totals[0]:13.2f}"
    )
    print("(each evaluator falls back to the other, so 'ok' is whether the case folds with that preference)")
    chain = chain_model(2000)
    a, b = interleaved(lambda p: time_pass(p, chain), args.repeats)
    print(f"fold_constants, 2000-Add chain: ort-first {a:.3f}s, reference-first {b:.3f}s, ratio {b / a:.2f}")
    from models import zoo

    tr = zoo.build("transformer")
    a, b = interleaved(lambda p: time_pass(p, tr), args.repeats)
    print(f"fold_constants, zoo transformer: ort-first {a:.3f}s, reference-first {b:.3f}s, ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
