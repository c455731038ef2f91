"""Can any width plan make latency fall in proportion to MACs? The cost model's answer, then measured.

For each digits conv net, every combination of the prunable groups' widths that a budgeted plan may
choose (default rounding, ``min_width`` 8, ``max_ratio`` 0.9: the same options as
``--prune-target latency``) is estimated with the latency cost model (``onnxshrink.prune_cost``,
default kernel table, batch 1). For each latency cut asked (``--cuts``: 0.3 = 30% less estimated
latency), the plan with the highest *share* (estimated speed-up / (MACs before / MACs after)) among
those reaching the cut is kept: no plan on these widths can do better by the cost model. That plan is
then built (``layer_ratios`` per producer, criterion ``l1``: only widths matter for timing) and timed
interleaved against the unpruned model (ONNX Runtime CPU, 1 thread, batch 1 and 32, medians), so the
bound is checked against the machine, not only against the model of it. Models with more than
``--max-plans`` combinations are skipped.

    /work/venv/bin/python benchmarks/bench_prune_bound.py [--models resnet,cnn] [--cuts 0.3,0.5]
        [--runs 200] [--out benchmarks/results]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_prune import interleaved, machine
from models import digits
from onnxshrink import bench, depgraph, model_io, pipeline, prune_cost, pruning
from onnxshrink.prune_plan import _group_plan, _min_keep, _options, default_round_to

MODELS = ("resnet", "mobilenet", "inception", "cnn", "resnet_wide", "mobilenet_wide")


def plans(name: str, max_plans: int):
    """(live groups' producers and widths, [(est speed-up, x MACs, widths)]) over every width combination."""
    model = model_io.load(str(digits.trained_path(name)))
    pruning._run(model, pipeline.pre_prune_steps(), [], pipeline.PipelineReport())  # as prune() plans
    dg = depgraph.build(model)
    step = default_round_to()
    conv_ops = {n.name for n in model.graph.all_nodes() if n.op_type in ("Conv", "ConvTranspose")}
    live = [(g, gp) for g, gp in ((g, _group_plan(g, conv_ops)) for g in dg.groups)
            if not g.blocked and _min_keep(gp, step, 8) < gp.atoms]
    opts = [_options(gp, step, 8, 0.9) for _, gp in live]
    count = int(np.prod([len(o) for o in opts]))
    groups = [(gp.producers[0], gp.atoms * gp.channels_per_atom, gp.channels_per_atom) for _, gp in live]
    if count > max_plans:
        return groups, count, []
    cost = prune_cost.build(model, dg, [g for g, _ in live])
    d0 = cost.describe([gp.atoms for _, gp in live])
    rows = []
    for keep in itertools.product(*opts):
        d = cost.describe(keep)
        rows.append((d0["latency_us"] / d["latency_us"], d0["macs"] / max(d["macs"], 1),
                     [k * gp.channels_per_atom for k, (_, gp) in zip(keep, live)]))
    return groups, count, rows


def best(rows, cut: float):
    ok = [r for r in rows if r[0] >= 1 / (1 - cut) - 1e-9]
    return max(ok, key=lambda r: (r[0] / r[1], r[0])) if ok else None


def run_model(name: str, cuts, runs: int, max_plans: int) -> dict:
    groups, count, rows = plans(name, max_plans)
    entry: dict = {"groups": groups, "plans": count, "cuts": {}}
    print(f"{name}: {count} width plans over {[w for _, w, _ in groups]}", flush=True)
    if not rows:
        return entry
    path = str(digits.trained_path(name))
    x, _ = digits.model_input(name, "test")
    with tempfile.TemporaryDirectory(prefix="bench-bound-") as tmp:
        for cut in cuts:
            b = best(rows, cut)
            if b is None:
                entry["cuts"][str(cut)] = {"error": "no plan reaches this cut"}
                continue
            est, xmacs, widths = b
            ratios = {p: 1 - w / full for (p, full, _), w in zip(groups, widths) if w < full}
            out = str(Path(tmp) / f"{cut}.onnx")
            res = pruning.prune(path, 0.0, out, layer_ratios=ratios)
            real = res.before["macs"] / res.after["macs"]
            load = [round(os.getloadavg()[0], 2)]
            speed = {}
            for batch in (1, 32):
                t = interleaved({"unpruned": path, "best": out}, {"input": x[:batch]},
                                runs if batch == 1 else max(runs // 4, 30))
                speed[batch] = bench.paired_ratio(t["unpruned"], t["best"], bootstrap=0).speedup
            load.append(round(os.getloadavg()[0], 2))
            entry["cuts"][str(cut)] = {"est": est, "x_macs_est": xmacs, "x_macs": real, "widths": widths,
                                       "speedup": speed, "load": load}
            print(f"  {name} cut {cut}: widths {widths} est {est:.2f}x, x MACs {real:.2f} "
                  f"-> b1 {speed[1]:.2f}x b32 {speed[32]:.2f}x (load {load})", flush=True)
    return entry


def _machine() -> str:
    from onnxshrink import kernel_table

    m = machine()
    return (f"Machine: {m['cpu']}; ONNX Runtime NCHWc block {m['nchwc_block']} (the rounding step); "
            f"cost model: kernel table {kernel_table.load().source}.")


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# The most MAC-proportional width plan the cost model allows (default rounding)",
        "",
        _machine(),
        "",
        ("`python benchmarks/bench_prune_bound.py` (see its docstring). Per model and latency cut: among every "
        "combination of group widths a budgeted plan may choose, the one with the highest estimated "
        "speed-up / `x MACs` that reaches the cut; then built and timed (1 thread, interleaved with the "
        "unpruned model, medians). `est`: estimated speed-up at batch 1; `x MACs`: MACs before / after "
        "(onnxshrink's counter on the built model); `b1`/`b32`: measured speed-up; `of x MACs`: b1/b32 "
        "as a share of `x MACs`. `load`: 1-minute load average before/after the timing (2 shared cores)."),
        "",
        ("| model | plans | cut | widths (unpruned) | widths | est | est of x MACs | x MACs | b1 | b32 | of x MACs "
        "| load |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results.items():
        full = " ".join(str(w) for _, w, _ in e["groups"])
        if not e["cuts"]:
            lines.append(f"| {name} | {e['plans']} | | {full} | too many plans to enumerate | | | | | | | |")
        for cut, c in e["cuts"].items():
            if "error" in c:
                lines.append(f"| {name} | {e['plans']} | {cut} | {full} | {c['error']} | | | | | | | |")
                continue
            s, xm = c["speedup"], c["x_macs"]
            lines.append(
                f"| {name} | {e['plans']} | {cut} | {full} | {' '.join(map(str, c['widths']))} | {c['est']:.2f}x | "
                f"{100 * c['est'] / c['x_macs_est']:.0f}% | {xm:.2f}x | {s[1]:.2f}x | {s[32]:.2f}x | "
                f"{100 * s[1] / xm:.0f}%/{100 * s[32] / xm:.0f}% | {c['load'][0]}-{c['load'][1]} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cuts", default="0.3,0.5")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--max-plans", type=int, default=200_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    cuts = [float(c) for c in args.cuts.split(",")]
    results = {m: run_model(m, cuts, args.runs, args.max_plans) for m in args.models.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_bound.json").write_text(json.dumps(results, indent=1, default=float))
    write_markdown({k: {**v, "cuts": {c: ({**x, "speedup": {int(b): s for b, s in x["speedup"].items()}}
                                          if "speedup" in x else x) for c, x in v["cuts"].items()}}
                    for k, v in json.loads((out / "prune_bound.json").read_text()).items()}, out / "prune_bound.md")
    print((out / "prune_bound.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
