"""Do the newer lossless fusions slow ONNX Runtime down? (CPU, 1 thread, interleaved, ratios)

Each fusion is measured on the models it fires on: the model optimized by the ``default`` preset with
the fusion against the same preset without it (``fuse_activations``, ``fold_scalar_scales`` or
``avoid_skip_layernorm`` left out; ``fuse_conv_bias`` with ``scale=False``), plus synthetic blocks:
a hard-swish stack, and post-LN residual blocks (``Add -> LayerNormalization``, alone, after the
projection's ``MatMul + bias``, and into a written-out layer norm at opset 14) at batch x tokens x
hidden from 1x17x64 to 8x128x768, written as
exported (ONNX Runtime fuses them into its ``SkipLayerNormalization``) and after ``avoid_skip_layernorm``.
PP-OCR models for the first two, the zoo transformer and the trained digits ViT (batch 64) for the
last two. Both sessions run interleaved (A B A B ...) on the same feed; the report gives median
latencies and the median of the paired ratios with/without (< 1: the fusion makes ORT faster). Both
ORT levels: ``enable_all`` (what users run; ORT fuses Conv+Mul by itself there) and ``disable_all``
(what the graph alone costs).

    python benchmarks/bench_fusions_ort.py [--rounds 30] [--only ppocr_det,hardswish,skip_layernorm,...]
    # rerun some cases into the earlier results (their rows replaced, the rerun noted):
    python benchmarks/bench_fusions_ort.py --only skip_layernorm,digits_vit,transformer --merge

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


#: (batch, tokens, hidden) of the synthetic post-LN blocks.
BLOCK_SHAPES = ((1, 17, 64), (60, 17, 64), (1, 64, 256), (32, 64, 256), (1, 128, 768), (8, 128, 768))


def synthetic_residual_ln(shape, projection: bool, written_out: bool = False) -> bytes:
    """``LayerNorm(r + t)`` on ``shape``, ``t = x @ W + b`` with ``projection`` (a BERT layer's tail), else x;
    ``written_out``: the layer norm as PyTorch exports below opset 17 write it (opset 14; with ``Pow``, which
    ORT's LayerNormFusion matches), else the op (17)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden = shape[-1]
    nodes = [helper.make_node("Add", ["r", "t"], ["s"])]
    if written_out:
        nodes += [helper.make_node("ReduceMean", ["s"], ["mean"], axes=[-1]),
                  helper.make_node("Sub", ["s", "mean"], ["d"]), helper.make_node("Pow", ["d", "two"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
                  helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
                  helper.make_node("Div", ["d", "std"], ["n"]), helper.make_node("Mul", ["n", "g"], ["gn"]),
                  helper.make_node("Add", ["gn", "be"], ["y"])]
    else:
        nodes.append(helper.make_node("LayerNormalization", ["s", "g", "be"], ["y"], axis=-1, epsilon=1e-5))
    inits = {"g": rng.uniform(0.5, 1.5, hidden), "be": rng.standard_normal(hidden),
             **({"eps": np.array(1e-5), "two": np.array(2.0)} if written_out else {})}
    if projection:
        nodes[:0] = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["t"])]
        inits.update(W=rng.standard_normal((hidden, hidden)) / np.sqrt(hidden), b=rng.standard_normal(hidden))
    else:
        nodes.insert(0, helper.make_node("Identity", ["x"], ["t"]))
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("x", "r", "y")]
    graph = helper.make_graph(nodes, "block", vi[:2], vi[2:],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    opset = 14 if written_out else 17
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8).SerializeToString()


def rewritten(data: bytes, pass_name: str) -> bytes:
    model = model_io.load(data)
    result = make_pass(pass_name)(model)
    assert result.modified, f"{pass_name} did not fire"
    return model_io.to_bytes(model)


def cases(only):
    """(label, fusion, without, with, feed) for every measured pair; ``only``: labels or groups
    (``hardswish``, ``skip_layernorm``, model names)."""
    want = (lambda *keys: True) if not only else (lambda *keys: bool(only & set(keys)))
    x = {"x": np.random.default_rng(0).standard_normal((1, 32, 80, 80)).astype(np.float32) * 4}
    for opset in (12, 14):
        if want("hardswish"):
            yield (f"synthetic x6 opset {opset}", "fuse_activations", synthetic_hardswish(opset, False),
                   synthetic_hardswish(opset, True), x)
    for shape in BLOCK_SHAPES if want("skip_layernorm") else ():
        rng = np.random.default_rng(1)
        feed = {n: rng.standard_normal(shape).astype(np.float32) for n in ("x", "r")}
        for projection in (False, True):
            block = synthetic_residual_ln(shape, projection)
            label = f"{'MatMul+bias+' if projection else ''}Add+LayerNorm {'x'.join(map(str, shape))}"
            yield label, "avoid_skip_layernorm", block, rewritten(block, "avoid_skip_layernorm"), feed
        block = synthetic_residual_ln(shape, False, written_out=True)
        label = f"Add+written-out LayerNorm (opset 14) {'x'.join(map(str, shape))}"
        yield label, "avoid_skip_layernorm", block, rewritten(block, "avoid_skip_layernorm"), feed
    for name in fetch_real.REAL:
        if not want(name) or not name.startswith("ppocr"):
            continue
        path = fetch_real.fetch(name)
        feed = fetch_real.example_feeds(name, 1, seed=0)[0]
        full = optimized(path)
        yield name, "fuse_activations", optimized(path, "fuse_activations"), full, feed
        yield name, "conv scales (fuse_conv_bias scale + fold_scalar_scales)", optimized(path, "conv_scale"), full, feed
        if name.endswith("_rec"):  # one residual Add into a written-out layer norm that ORT fuses
            yield name, "avoid_skip_layernorm", optimized(path, "avoid_skip_layernorm"), full, feed
    for name, path, feed in _attention_models(want):
        full = optimized(path)
        yield name, "fold_scalar_scales", optimized(path, "fold_scalar_scales"), full, feed
        yield name, "avoid_skip_layernorm", optimized(path, "avoid_skip_layernorm"), full, feed


def _attention_models(want):
    """(name, path, feed) of the transformer models (zoo transformer, trained digits ViT)."""
    import tempfile

    from models import digits, zoo

    if want("transformer"):
        path = zoo.save("transformer", tempfile.mkdtemp(prefix="bench-fusions-"))
        from onnxshrink import data

        specs = data.input_specs(model_io.load(path))
        yield "transformer", path, data.random_feed(specs, 0, {d: 8 for s in specs for d in s.dims if isinstance(d, str)})
    if want("digits_vit"):
        x, _ = digits.model_input("vit", "test")
        yield "digits_vit", digits.trained_path("vit"), {"input": x[:64]}


HEADER = ("| model | fusion | ORT level | without ms | with ms | ratio |", "|---|---|---|---:|---:|---:|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--only", help="comma-separated cases: real model names, transformer, digits_vit, "
                                   "hardswish, skip_layernorm")
    ap.add_argument("--merge", action="store_true", help="replace the rerun rows in the earlier results")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    load = os.getloadavg()[0]
    from onnxshrink.ort_blocks import cpu_name

    when = (f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, onnxruntime {ort.__version__}, CPU, 1 thread, "
            f"{args.rounds} interleaved rounds, load average {load:.1f} at the start")
    rows = []
    for label, fusion, without, with_, feed in cases(only):
        for level_name, level in LEVELS.items():
            ta, tb, ratio = measure(session(without, level), session(with_, level), feed, args.rounds)
            rows.append(f"| {label} | {fusion} | {level_name} | {ta * 1e3:.2f} | {tb * 1e3:.2f} | {ratio:.3f} |")
            print(rows[-1], flush=True)
    path = RESULTS / "fusions_ort.md"
    if args.merge and path.exists():
        text = merge(path.read_text(), rows, f"Rerun later (`--merge`), their rows replaced or added: "
                                             f"{', '.join(sorted(only or ['all']))} ({when}).")
    else:
        text = "\n".join(["# Lossless fusions on ONNX Runtime: with / without", "",
                          (f"Written by `python benchmarks/bench_fusions_ort.py` ({when}; the machine is shared). "
                           "Ratio: median of paired with/without latencies (< 1: faster with)."),
                          "", *HEADER, *rows]) + "\n"
    RESULTS.mkdir(exist_ok=True)
    path.write_text(text)
    return 0


def merge(old: str, rows: list[str], note: str) -> str:
    """``old`` with each row of ``rows`` replacing the row of the same model, fusion and level (or
    appended), and ``note`` added after the first paragraph."""
    def key(row: str) -> tuple:
        return tuple(c.strip() for c in row.strip("|").split("|")[:3])

    lines = old.rstrip("\n").split("\n")
    new = {key(r): r for r in rows}
    out = [new.pop(key(line), line) if line.startswith("| ") and line not in HEADER else line for line in lines]
    out += list(new.values())
    at = out.index(HEADER[0])
    return "\n".join([*out[:at - 1], "", note, "", *out[at:]]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
