"""Does removing whole residual blocks make latency fall in proportion to MACs, where narrowing does not?

Width pruning leaves every node in place and runs narrower kernels, which ONNX Runtime's CPU convs run
slower per MAC (``results/prune_kernels.md``). This benchmark asks whether the shortfall against the
MAC-proportional speed-up is in the widths or in the parts that no pruning touches: for each digits
net with identity-shortcut residual blocks (resnet, mobilenet and their 32x32 variants), each such
block, and all of them at once, is removed whole: the block's branch is replaced by its per-channel
mean over the 512-sample calibration split (``Add(x, branch(x))`` becomes ``Add(x, mean)``, the
branch's nodes die), then the model goes through ``prune`` at ratio 0 (cleanup and lossless passes).
Beside it, onnxshrink's width pruning with the same MACs removed (``--prune-target macs``,
``recon+lsq``, default rounding). All three (unpruned as trained, block removed, width-pruned) are
timed interleaved (ONNX Runtime CPU, 1 thread, batch 1 and 32, medians); accuracy on the 360-sample
test split. A block is found from the graph alone: an ``Add`` one of whose inputs reaches the other
through nodes that only it feeds (constants aside).

A measurement for the record of the latency goal, not a feature: removing blocks without training
costs accuracy the channels do not (see the table).

    /work/venv/bin/python benchmarks/bench_prune_depth.py [--models resnet,mobilenet] [--runs 200]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_prune import accuracy, interleaved
from models import digits
from onnxshrink import bench, channel_stats, model_io, pruning, stats
from onnxshrink.graph_utils import add_initializer, clone_model

MODELS = ("resnet", "mobilenet", "resnet_wide", "mobilenet_wide")
MAX_BRANCH = 64  # nodes; a longer walk is not a block


def _branch(x: ir.Value, b: ir.Value) -> list[ir.Node] | None:
    """Nodes computing ``b`` from ``x`` (and constants) alone, each feeding only the branch or the Add."""
    todo, seen, reached = [b.producer()], set(), False
    while todo:
        node = todo.pop()
        if node is None or len(seen) > MAX_BRANCH:
            return None
        if node in seen:
            continue
        seen.add(node)
        for v in node.inputs:
            if v is None or v.const_value is not None:
                continue
            if v is x:
                reached = True
            else:
                todo.append(v.producer())
    if not reached:
        return None
    for node in seen:
        for out in node.outputs:
            if out is not b and any(user not in seen for user, _ in out.uses()):
                return None
    return list(seen)


def residual_blocks(model: ir.Model) -> list[tuple[ir.Node, int]]:
    """``(add, branch input index)`` for each Add whose other input is the block's input, in graph order."""
    found = []
    for node in model.graph:
        if node.op_type != "Add" or len(node.inputs) != 2:
            continue
        for i in (0, 1):
            nodes = _branch(node.inputs[1 - i], node.inputs[i])
            if nodes and any(n.op_type == "Conv" for n in nodes):
                found.append((node, i))
                break
    return found


def branch_means(path: str, values: list[ir.Value], calib: list[dict]) -> list[np.ndarray]:
    """Means of ``values`` over the calibration feeds and all but axis 1 (``channel_stats``, reduced in
    the graph), shaped to broadcast against them ([1, C, 1, ...]: these nets' block tensors have the
    input's rank)."""
    from onnx_ir.passes.common import ShapeInferencePass

    model = ShapeInferencePass()(model_io.load(path)).model  # channel_stats needs the taps' ranks
    by_name = {v.name: v for n in model.graph for v in n.outputs}
    taps = [channel_stats.ChannelTap(by_name[v.name], 1, "mean") for v in values]
    rank = len(model.graph.inputs[0].shape)
    return [m.astype(np.float32).reshape([1, -1] + [1] * (rank - 2))
            for m in channel_stats.collect(model, calib, taps)]


def drop_blocks(path: str, which: tuple[int, ...], calib: list[dict], out: str) -> None:
    """Replace the branches of blocks ``which`` by their calibration means; clean up; write ``out``."""
    model = clone_model(model_io.load(path))
    blocks = [residual_blocks(model)[k] for k in which]
    means = branch_means(path, [add.inputs[i] for add, i in blocks], calib)
    for (add, i), mean in zip(blocks, means):
        add.replace_input_with(i, add_initializer(model.graph, mean, f"{add.name}_branch_mean"))
    tmp = out + ".raw.onnx"
    model_io.save(model, tmp)
    pruning.prune(tmp, 0.0, out)  # dead branch nodes removed, lossless passes as for a pruned model
    os.remove(tmp)


def run_model(name: str, runs: int, tmp: Path) -> list[dict]:
    path = str(digits.trained_path(name))
    calib = digits.feeds(name, "calib")
    base = model_io.load(path)
    n_blocks = len(residual_blocks(base))
    macs0 = stats.macs(base, {"N": 1})
    acc0 = accuracy(path, name)
    combos = [(k,) for k in range(n_blocks)] + ([tuple(range(n_blocks))] if n_blocks > 1 else [])
    rows = []
    x, _ = digits.model_input(name, "test")
    for which in combos:
        tag = "+".join(map(str, which))
        depth = str(tmp / f"{name}_depth_{tag}.onnx")
        drop_blocks(path, which, calib, depth)
        macs_d = stats.macs(model_io.load(depth), {"N": 1})
        width = str(tmp / f"{name}_width_{tag}.onnx")
        res = pruning.prune(path, 1 - macs_d / macs0, width, target="macs", criterion="reconstruction",
                            reconstruct="lsq", calibration=calib)
        macs_w = res.after["macs"]
        row = {"model": name, "blocks": list(which), "of_blocks": n_blocks, "acc_unpruned": acc0,
               "acc": {"depth": accuracy(depth, name), "width": accuracy(width, name)},
               "x_macs": {"depth": macs0 / macs_d, "width": macs0 / macs_w},
               "widths": " ".join(str(g.kept_channels) for g in res.plan.groups if g.status != "blocked"),
               "load": [round(os.getloadavg()[0], 2)], "speedup": {}, "median_us": {}}
        for batch in (1, 32):
            t = interleaved({"unpruned": path, "depth": depth, "width": width}, {"input": x[:batch]},
                            runs if batch == 1 else max(runs // 4, 30))
            row["speedup"][batch] = {k: bench.paired_ratio(t["unpruned"], t[k], bootstrap=0).speedup
                                     for k in ("depth", "width")}
            row["median_us"][batch] = {k: 1e6 * float(np.median(v)) for k, v in t.items()}
        row["load"].append(round(os.getloadavg()[0], 2))
        s = row["speedup"]
        print(f"  {name} blocks {tag}: depth x MACs {row['x_macs']['depth']:.2f} b1 {s[1]['depth']:.2f}x "
              f"b32 {s[32]['depth']:.2f}x acc {row['acc']['depth']:.3f}; width x MACs "
              f"{row['x_macs']['width']:.2f} b1 {s[1]['width']:.2f}x b32 {s[32]['width']:.2f}x "
              f"acc {row['acc']['width']:.3f}", flush=True)
        rows.append(row)
    return rows


def write_markdown(rows: list[dict], path: Path) -> None:
    lines = [
        "# Removing whole residual blocks against narrowing, at the same MACs",
        "",
        ("`python benchmarks/bench_prune_depth.py` (see its docstring). `depth`: the listed identity-shortcut "
         "blocks removed (branch replaced by its calibration mean, no other change); `width`: onnxshrink "
         "width pruning to the same MACs (`--prune-target macs`, recon+lsq, default rounding; `widths`: kept "
         "channels per prunable group). `x MACs`: MACs before / after; `b1`/`b32`: speed-up over the "
         "unpruned model as trained (1 thread, the three models timed interleaved, medians); `of x MACs`: "
         "b1/b32 as a share of `x MACs`; `acc`: test accuracy (%), unpruned first. `load`: 1-minute load "
         "average before/after (2 shared cores)."),
        "",
        ("| model | blocks removed | acc unpruned | depth x MACs | depth b1 | depth b32 | depth of x MACs | depth acc "
         "| width x MACs | width b1 | width b32 | width of x MACs | width acc | widths | load |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for k in ("depth", "width"):
            xm, s1, s32 = r["x_macs"][k], r["speedup"][1][k], r["speedup"][32][k]
            cells += [f"{xm:.2f}x", f"{s1:.2f}x", f"{s32:.2f}x", f"{100 * s1 / xm:.0f}%/{100 * s32 / xm:.0f}%",
                      f"{100 * r['acc'][k]:.1f}"]
        blocks = f"{'+'.join(str(b + 1) for b in r['blocks'])} of {r['of_blocks']}"
        lines.append(f"| {r['model']} | {blocks} | {100 * r['acc_unpruned']:.1f} | {' | '.join(cells)} | "
                     f"{r['widths']} | {r['load'][0]}-{r['load'][1]} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-depth-") as tmp:
        rows = list(itertools.chain.from_iterable(
            run_model(m, args.runs, Path(tmp)) for m in args.models.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_depth.json").write_text(json.dumps(rows, indent=1, default=float))
    write_markdown(json.loads((out / "prune_depth.json").read_text(), object_hook=_int_keys), out / "prune_depth.md")
    print((out / "prune_depth.md").read_text())
    return 0


def _int_keys(d: dict) -> dict:
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
