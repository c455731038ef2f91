"""Where the time of a pruned model goes on ONNX Runtime's CPU kernels, and why it falls less than MACs.

1. Profiles (``SessionOptions.enable_profiling``, 1 thread) of each digits model unpruned and pruned at
   ``--ratio`` (default rounding), batch 1 and 32: kernel time per op type after ONNX Runtime's own
   optimizations (NCHWc reorders included), the time outside kernels (``model_run`` minus the kernels:
   per-run and per-node overhead), the node count, and the conv kernels' speed-up against their MACs
   reduction. Wall medians come from separate, unprofiled, interleaved runs.
2. Conv kernel throughput (GMAC/s) by width: one Conv+Relu model per width, 3x3 and 1x1 with as many
   input as output channels, 3x3 with 64 inputs and a range of outputs, and depthwise 3x3, at 16x16 and
   batch 32, with the NCHWc layout (level ``all``) and without it (level ``extended``).
3. Per-run and per-node overhead: chains of 1, 10 and 40 Relu nodes on a 16-element tensor.
4. ``SkipLayerNormalization`` (what ONNX Runtime fuses Add + LayerNormalization into when the shapes are
   static) against the unfused pair, [N, 16, 64].

    /work/venv/bin/python benchmarks/bench_prune_kernels.py [--models resnet,resnet_wide] [--ratio 0.5]
        [--out benchmarks/results] [--stem prune_kernels]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_prune

from benchmarks._common import kept_reading
from models import digits
from onnxshrink import pruning, runtime

MODELS = ("resnet", "mobilenet", "inception", "vit", "resnet_wide", "mobilenet_wide")
WIDTHS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _ort():
    return runtime.ort()


def _session(model, level: str = "all", profile: str | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, profile
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _median_run(sess, feed: dict, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        sess.run(None, feed)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


# ---------------------------------------------------------------- 1. model profiles


def profile(path: str, feed: dict, runs: int, tmp: str) -> dict:
    """Median kernel time per node (us), grouped by op type, and median model_run (us)."""
    sess = _session(path, profile=os.path.join(tmp, "p"))
    for _ in range(10 + runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict = collections.defaultdict(list)
    model_run = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["name"], e["args"].get("op_name", "?"))].append(e["dur"])
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            model_run.append(e["dur"])
    by_op: dict = collections.defaultdict(float)
    for (_, op), durs in per_node.items():
        by_op[op] += float(np.median(durs[-runs:]))
    return {"by_op": dict(by_op), "kernels": sum(by_op.values()), "model_run": float(np.median(model_run[-runs:])),
            "nodes": len(per_node)}


def model_rows(name: str, ratio: float, tmp: str) -> dict:
    src = str(digits.trained_path(name))
    pruned = os.path.join(tmp, f"{name}.onnx")
    result = pruning.prune(src, ratio, pruned)
    x, _ = digits.model_input(name, "test")
    out: dict = {"macs": [result.before["macs"], result.after["macs"]], "batches": {}}
    for batch in (1, 32):
        feed = {"input": x[:batch]}
        runs = 200 if batch == 1 else 40
        sessions = [_session(src), _session(pruned)]
        walls = [[], []]
        for _ in range(5):
            for s in sessions:
                s.run(None, feed)
        for i in range(runs):
            for j in (0, 1) if i % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                sessions[j].run(None, feed)
                walls[j].append(time.perf_counter() - t0)
        prof = [profile(p, feed, runs, tmp) for p in (src, pruned)]
        out["batches"][batch] = {"wall_us": [1e6 * float(np.median(w)) for w in walls], "profile": prof}
    return out


# ---------------------------------------------------------------- 2. conv kernel throughput


def conv_model(cin: int, cout: int, k: int, hw: int, group: int = 1) -> bytes:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.random((cout, cin // group, k, k), np.float32), "w")
    b = numpy_helper.from_array(rng.random(cout, np.float32), "b")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4, group=group),
         helper.make_node("Relu", ["c"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, hw, hw])], [w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def gmacs(cin: int, cout: int, k: int, level: str, tmp: str, group: int = 1, hw: int = 16, batch: int = 32,
          runs: int = 25) -> float:
    """Throughput of the Conv kernel alone (the profiler's kernel time: the NCHWc reorders around a lone
    conv are left out, as in a network they are paid once per layout change, not per conv)."""
    x = np.random.default_rng(1).random((batch, cin, hw, hw), np.float32)
    sess = _session(conv_model(cin, cout, k, hw, group), level, profile=os.path.join(tmp, "k"))
    for _ in range(5 + runs):
        sess.run(None, {"x": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    durs = [e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
            and e["args"].get("op_name") in ("Conv", "FusedConv")]
    return batch * hw * hw * cout * (cin // group) * k * k / (float(np.median(durs[-runs:])) * 1e-6) / 1e9


def kernel_table(tmp: str) -> dict:
    table: dict = {}
    for level in ("all", "extended"):
        table[level] = {
            "3x3 cin=cout": {w: gmacs(w, w, 3, level, tmp) for w in WIDTHS},
            "1x1 cin=cout": {w: gmacs(w, w, 1, level, tmp) for w in WIDTHS},
            "3x3 cin=64": {w: gmacs(64, w, 3, level, tmp) for w in WIDTHS},
            "depthwise 3x3": {w: gmacs(w, w, 3, level, tmp, group=w) for w in WIDTHS},
        }
        print(f"kernels ({level}): {json.dumps({k: {w: round(v, 1) for w, v in r.items()} for k, r in table[level].items()})}",
              flush=True)
    return table


# ---------------------------------------------------------------- 3, 4. overheads and a fused kernel


def _chain(n: int) -> bytes:
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, ["N", 16])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def overheads() -> dict:
    x = np.ones((1, 16), np.float32)
    return {n: 1e6 * _median_run(_session(_chain(n), "none"), {"t0": x}, 2000, 50) for n in (1, 10, 40)}


def _norm_model(fused: bool) -> bytes:
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 16, 64]) for n in ("a", "b")]
    inits = [numpy_helper.from_array(np.ones(64, np.float32), "g"), numpy_helper.from_array(np.zeros(64, np.float32), "be")]
    if fused:
        nodes = [helper.make_node("SkipLayerNormalization", ["a", "b", "g", "be"], ["y"], domain="com.microsoft",
                                  epsilon=1e-5)]
    else:
        nodes = [helper.make_node("Add", ["a", "b"], ["t"]),
                 helper.make_node("LayerNormalization", ["t", "g", "be"], ["y"], axis=-1, epsilon=1e-5)]
    g = helper.make_graph(nodes, "norm", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 64])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
                             ).SerializeToString()


def skip_layer_norm() -> dict:
    out = {}
    for batch in (1, 32):
        rng = np.random.default_rng(0)
        feed = {k: rng.random((batch, 16, 64), np.float32) for k in ("a", "b")}
        out[batch] = {label: 1e6 * _median_run(_session(_norm_model(fused), "none"), feed, 500, 20)
                      for label, fused in (("Add+LayerNormalization", False), ("SkipLayerNormalization", True))}
    return out


# ---------------------------------------------------------------- report


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def profile_lines(name: str, row: dict, ratio: float) -> list[str]:
    macs = row["macs"][0] / max(row["macs"][1], 1)
    lines = ["", f"### {name}, ratio {ratio}: {macs:.2f}x fewer MACs", "",
             "| | b1 unpruned us | b1 pruned us | b1 speed-up | b32 unpruned us | b32 pruned us | b32 speed-up |",
             "|---|---|---|---|---|---|---|"]
    b1, b32 = row["batches"][1], row["batches"][32]
    ops = sorted(set(b1["profile"][0]["by_op"]) | set(b1["profile"][1]["by_op"]),
                 key=lambda op: -b32["profile"][0]["by_op"].get(op, 0.0))

    def cells(b, get):
        a, p = get(b, 0), get(b, 1)
        return f"{_fmt(a)} | {_fmt(p)} | {a / p:.2f}x" if p else f"{_fmt(a)} | 0 | -"

    rows = [(op, lambda b, i, op=op: b["profile"][i]["by_op"].get(op, 0.0)) for op in ops]
    rows += [("all kernels", lambda b, i: b["profile"][i]["kernels"]),
             ("outside kernels (model_run - kernels)", lambda b, i: b["profile"][i]["model_run"] - b["profile"][i]["kernels"]),
             ("wall, not profiled", lambda b, i: b["wall_us"][i])]
    for label, get in rows:
        lines.append(f"| {label} | {cells(b1, get)} | {cells(b32, get)} |")
    n = b1["profile"]
    lines.append(f"| nodes after ORT optimization | {n[0]['nodes']} | {n[1]['nodes']} | | | | |")
    return lines


def kernel_lines(table: dict) -> list[str]:
    if not table:
        return []
    lines = ["", "## Conv kernel throughput by width (GMAC/s, 1 thread, 16x16, batch 32)", "",
             ("One Conv+Relu model per cell, the Conv kernel's time from the profiler (reorders into and out "
             "of the NCHWc layout left out). `all`: ONNX Runtime's NCHWc layout (what a session uses by "
             "default); `extended`: without it (im2col + SGEMM; 1x1: SGEMM). Width = input and output channels, except "
             "`3x3 cin=64` (64 inputs, width outputs) and depthwise (width channels, one per group)."), "",
             "| kernel | level | " + " | ".join(str(w) for w in WIDTHS) + " |",
             "|---|---|" + "---|" * len(WIDTHS)]
    for level, kinds in table.items():
        for kind, row in kinds.items():
            lines.append(f"| {kind} | {level} | " + " | ".join(f"{row[w]:.1f}" for w in WIDTHS) + " |")
    return lines


def write_markdown(results: dict, path: Path) -> None:
    reading = kept_reading(path)
    ratio = results["ratio"]
    lines = ["# Where a pruned model's time goes on ONNX Runtime (CPU, 1 thread)", "",
             *([f"Machine: {m['cpu']}; ONNX Runtime NCHWc block {m['nchwc_block']}.", ""]
               if (m := results.get("machine")) else []),
             ("`python benchmarks/bench_prune_kernels.py` (see its docstring). Load average (1 min) "
              f"{results['load'][0]} before, {results['load'][1]} after (2 shared cores)."), "",
             f"## Profiles: unpruned against pruned at {ratio} (default rounding)", "",
             ("Kernel times: medians per node from ONNX Runtime's profiler, summed per op type (ops as ONNX Runtime "
              "runs them after its own fusions and NCHWc layout). Profiling adds per-node cost; the unprofiled "
              "wall times come from separate interleaved runs.")]
    for name, row in results["models"].items():
        lines += profile_lines(name, row, ratio)
    lines += kernel_lines(results["kernels"])
    oh = results["overhead"]
    lines += ["", "## Per-run and per-node overhead", "",
              (f"Relu chains on 16 floats, no graph optimization: 1 node {oh[1]:.1f} us, 10 nodes {oh[10]:.1f} us, "
              f"40 nodes {oh[40]:.1f} us per run, i.e. about {(oh[40] - oh[1]) / 39:.2f} us per node on top of "
              f"{oh[1]:.1f} us per run.")]
    sln = results["skip_layer_norm"]
    lines += ["", "## SkipLayerNormalization against Add + LayerNormalization ([N, 16, 64], us)", "",
              "| batch | Add+LayerNormalization | SkipLayerNormalization |", "|---|---|---|"]
    lines += [f"| {b} | {v['Add+LayerNormalization']:.1f} | {v['SkipLayerNormalization']:.1f} |" for b, v in sln.items()]
    path.write_text("\n".join(lines) + "\n" + reading)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel throughput table")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--stem", default="prune_kernels", help="output file names (e.g. prune_kernels_avx2)")
    args = ap.parse_args(argv)
    results: dict = {"ratio": args.ratio, "load": [round(os.getloadavg()[0], 2)], "models": {},
                     "machine": bench_prune.machine()}
    with tempfile.TemporaryDirectory(prefix="bench-prune-kernels-") as tmp:
        for name in filter(None, args.models.split(",")):
            results["models"][name] = model_rows(name, args.ratio, tmp)
            b = results["models"][name]["batches"]
            print(f"{name}: wall b1 {b[1]['wall_us']} b32 {b[32]['wall_us']}", flush=True)
        results["kernels"] = {} if args.no_kernels else kernel_table(tmp)
    results["overhead"] = overheads()
    results["skip_layer_norm"] = skip_layer_norm()
    results["load"].append(round(os.getloadavg()[0], 2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out / f"{args.stem}.md")
    print((out / f"{args.stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
