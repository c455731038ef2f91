"""Per-element cost of each op in float and in int8 on ONNX Runtime's CPU EP (1 thread), and of Q/DQ.

The QDQ planner (``passes/_qdq_costs.py``) decides which nodes run quantized by comparing estimated
times; this script measures the constants it uses. Every op runs alone in a session (float input for
float ops, uint8 input for the quantized kernels: QLinear* ops called directly, uint8 MaxPool /
Transpose / Concat), on four tensor sizes; the cost per output element is the mean slope of the median
latency between consecutive sizes, so per-run overheads cancel. Convolutions: latency fitted by least
squares on MACs and output elements, dense and depthwise apart.

    /work/venv/bin/python benchmarks/bench_qdq_op_costs.py [--runs 200] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(1, 32, 32, 32), (1, 64, 32, 32), (1, 64, 64, 64), (1, 64, 96, 96)]
MS = "com.microsoft"


def _model(nodes, inits, x_type, shape, y_type=None, opset=17):
    inp = h.make_tensor_value_info("x", x_type, list(shape))
    out = h.make_tensor_value_info("y", y_type or x_type, None)
    g = h.make_graph(nodes, "g", [inp], [out], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset), h.make_opsetid(MS, 1)])


def _time(model, feed, runs: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(10):
        s.run(None, feed)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feed)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _q(*names):
    scale = [nh.from_array(np.array(0.03, np.float32), n) for n in names if n.startswith("s")]
    zero = [nh.from_array(np.array(128, np.uint8), n) for n in names if n.startswith("z")]
    return scale + zero


# (name, float node builder, int8 node builder, extra inits, output elements / input elements)
def _cases():
    qio = ["s", "z"]
    yield ("Q", None, [h.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], _q("s", "z"), 1.0, "float")
    yield ("DQ", None, [h.make_node("DequantizeLinear", ["x", "s", "z"], ["y"])], _q("s", "z"), 1.0, "uint8")
    for op, q in (("Add", "QLinearAdd"), ("Mul", "QLinearMul")):
        yield (op, [h.make_node(op, ["x", "x"], ["y"])],
               [h.make_node(q, ["x", *qio, "x", *qio, *qio], ["y"], domain=MS)], _q("s", "z"), 1.0, None)
    for op, q, attrs in (("Sigmoid", "QLinearSigmoid", {}), ("LeakyRelu", "QLinearLeakyRelu", {"alpha": 0.1})):
        yield (op, [h.make_node(op, ["x"], ["y"], **attrs)],
               [h.make_node(q, ["x", *qio, *qio], ["y"], domain=MS, **attrs)], _q("s", "z"), 1.0, None)
    pool = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}
    yield ("MaxPool", [h.make_node("MaxPool", ["x"], ["y"], **pool)],
           [h.make_node("MaxPool", ["x"], ["y"], **pool)], [], 0.25, None)
    yield ("AveragePool", [h.make_node("AveragePool", ["x"], ["y"], **pool)],
           [h.make_node("QLinearAveragePool", ["x", *qio, *qio], ["y"], domain=MS, **pool)], _q("s", "z"), 0.25,
           None)
    yield ("Transpose", [h.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])],
           [h.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], [], 1.0, None)
    yield ("Concat", [h.make_node("Concat", ["x", "x"], ["y"], axis=1)],
           [h.make_node("QLinearConcat", ["s", "z", "x", "s", "z", "x", "s", "z"], ["y"], axis=1, domain=MS)],
           _q("s", "z"), 2.0, None)


def op_costs(runs: int) -> dict:
    """ns per output element: the slope of latency between consecutive sizes (fixed costs cancel)."""
    rng = np.random.default_rng(0)
    times: dict[str, dict[str, list]] = {}
    for shape in SHAPES:
        xf = rng.standard_normal(shape).astype(np.float32)
        xq = rng.integers(0, 256, shape).astype(np.uint8)
        for name, fnodes, qnodes, inits, ratio, only in _cases():
            row = times.setdefault(name, {"float": [], "int8": []})
            elems = int(np.prod(shape)) * ratio
            if fnodes is not None:
                row["float"].append((elems, _time(_model(fnodes, [], T.FLOAT, shape), {"x": xf}, runs)))
            src_float = only == "float"
            y_type = T.UINT8 if name != "DQ" else T.FLOAT
            model = _model(qnodes, inits, T.FLOAT if src_float else T.UINT8, shape, y_type)
            row["int8"].append((elems, _time(model, {"x": xf if src_float else xq}, runs)))
    out = {}
    for name, row in times.items():
        out[name] = {}
        for mode, pts in row.items():
            if len(pts) < 2:
                continue
            slopes = [(t2 - t1) / (n2 - n1) * 1e9 for (n1, t1), (n2, t2) in itertools.pairwise(pts)]
            out[name][mode] = round(float(np.mean(slopes)), 4)
    return out


def _conv_pair(c_in, c_out, k, group, hw, rng):
    w = (rng.standard_normal((c_out, c_in // group, k, k)) * 0.1).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    attrs = {"group": group, "pads": [k // 2] * 4}
    fm = _model([h.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)],
                [nh.from_array(w, "w"), nh.from_array(b, "b")], T.FLOAT, (1, c_in, hw, hw))
    q_inits = [nh.from_array(np.clip(np.rint(w / 0.01), -127, 127).astype(np.int8), "w"),
               nh.from_array(np.full(c_out, 0.01, np.float32), "ws"), nh.from_array(np.zeros(c_out, np.int8), "wz"),
               nh.from_array(np.rint(b / 3e-4).astype(np.int32), "b"), *_q("s", "z")]
    qm = _model([h.make_node("QLinearConv", ["x", "s", "z", "w", "ws", "wz", "s", "z", "b"], ["y"], **attrs)],
                q_inits, T.UINT8, (1, c_in, hw, hw))
    return fm, qm


CONVS = [  # (c_in, c_out, k, group, hw)
    (16, 32, 1, 1, 48), (32, 64, 1, 1, 32), (64, 128, 1, 1, 24), (128, 256, 1, 1, 12),
    (16, 16, 3, 1, 48), (32, 32, 3, 1, 32), (64, 64, 3, 1, 24),
    (32, 32, 3, 32, 48), (64, 64, 3, 64, 32), (128, 128, 3, 128, 16),
    (32, 32, 5, 32, 48), (96, 96, 5, 96, 24),
]


def conv_costs(runs: int) -> dict:
    rng = np.random.default_rng(1)
    rows = []
    for c_in, c_out, k, group, hw in CONVS:
        fm, qm = _conv_pair(c_in, c_out, k, group, hw, rng)
        xf = rng.standard_normal((1, c_in, hw, hw)).astype(np.float32)
        xq = rng.integers(0, 256, (1, c_in, hw, hw)).astype(np.uint8)
        tf, tq = _time(fm, {"x": xf}, runs), _time(qm, {"x": xq}, runs)
        elems = c_out * hw * hw
        rows.append({"shape": [c_in, c_out, k, group, hw], "depthwise": group > 1 and c_in == group,
                     "macs": elems * (c_in // group) * k * k, "out": elems,
                     "float_us": round(tf * 1e6, 1), "int8_us": round(tq * 1e6, 1)})
    fits = {}
    for dw in (False, True):
        sel = [r for r in rows if r["depthwise"] == dw]
        a = np.array([[r["macs"], r["out"]] for r in sel], np.float64)
        fit = {}
        for mode in ("float", "int8"):
            t = np.array([r[f"{mode}_us"] * 1e3 for r in sel])  # ns
            coef, *_ = np.linalg.lstsq(a, t, rcond=None)
            fit[mode] = {"ns_per_mac": round(float(max(coef[0], 0.0)), 5), "ns_per_out": round(float(max(coef[1], 0.0)), 4)}
        fits["depthwise" if dw else "dense"] = fit
    return {"convs": rows, "fit": fits}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    result = {"onnxruntime": ort.__version__, "ops_ns_per_element": op_costs(args.runs),
              **conv_costs(args.runs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qdq_op_costs.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ops_ns_per_element"], indent=1))
    print(json.dumps(result["fit"], indent=1))
    for r in result["convs"]:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
