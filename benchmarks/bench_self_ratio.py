"""Reproducibility of the interleaved latency ratio: a model timed against itself, 5 times over.

Two sessions of the same model (two copies of the file) are timed interleaved (A B, B A, ...) by
``onnxshrink.bench.measure`` with 1 intra-op thread; the speed-up of the copy over the original should
be 1. Each repeat opens fresh sessions. The script reports every repeat's ratio with its bootstrap 95%
interval and per-round spread, the spread of the ratios across repeats, and whether all of them stay
inside the stated band; it records the machine's load (``/proc/loadavg``) before and after, since the
machine is shared.

    python benchmarks/bench_self_ratio.py [--model resnet|path.onnx] [--shape N=4] [--repeats 5]
                                          [--runs 400] [--band 0.05] [--out benchmarks/results/self_ratio.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxshrink import bench, runtime


def model_path(name: str, folder: str) -> str:
    if name.endswith(".onnx"):
        return name
    from models import zoo

    return str(zoo.save(name, folder))


def loadavg() -> str:
    """The 1/5/15-minute load averages and the number of other processes above 20% CPU (``ps``)."""
    try:
        avg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        avg = "unknown"
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu", "--no-headers"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        busy = sum(1 for line in out.splitlines()
                   if int(line.split()[0]) != os.getpid() and float(line.split()[1]) > 20)
        return f"{avg}; {busy} other processes above 20% CPU"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return avg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet", help="zoo model name or .onnx path (default: resnet)")
    ap.add_argument("--shape", action="append", default=None, help="DIM=SIZE (default N=4)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--band", type=float, default=0.05, help="half-width of the band around 1.0 (default 0.05)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "self_ratio.md"))
    ap.add_argument("--append", action="store_true", help="add this run to --out instead of replacing it")
    args = ap.parse_args()
    dims = runtime.parse_dims(args.shape or ["N=4"])
    folder = tempfile.mkdtemp(prefix="self-ratio-")
    try:
        original = model_path(args.model, folder)
        copy = os.path.join(folder, "copy.onnx")
        shutil.copyfile(original, copy)
        load_before = loadavg()
        rows, t0 = [], time.time()
        for i in range(args.repeats):
            report = bench.measure([original, copy], None, providers="cpu", threads=1, warmup=args.warmup,
                                   runs=args.runs, dims=dims, seed=0, labels=["original", "copy"])
            cpu = report.providers["cpu"]
            r = cpu.ratio
            rows.append((i + 1, cpu.models[0].latency.median_ms, cpu.models[1].latency.median_ms, r))
            print(f"repeat {i + 1}: speed-up {r.speedup:.4f} (95% {r.ci_low:.4f}-{r.ci_high:.4f}), "
                  f"per-round p10-p90 {r.pair_p10:.3f}-{r.pair_p90:.3f}", file=sys.stderr)
        elapsed = time.time() - t0
        load_after = loadavg()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = render(args, dims, rows, load_before, load_after, elapsed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        text = out.read_text().rstrip() + "\n\n" + text.replace("# Interleaved", "## Another run: interleaved", 1)
    out.write_text(text)
    print(text)
    lo, hi = 1 - args.band, 1 + args.band
    return 0 if all(lo <= r.speedup <= hi for *_, r in rows) else 1


def render(args, dims, rows, load_before, load_after, elapsed) -> str:
    lo, hi = 1 - args.band, 1 + args.band
    ratios = [r.speedup for *_, r in rows]
    inside = sum(lo <= x <= hi for x in ratios)
    lines = [
        "# Interleaved latency ratio of a model against itself",
        "",
        (f"Model `{args.model}` ({', '.join(f'{k}={v}' for k, v in dims.items())}), CPU execution provider, "
        f"1 intra-op thread, {args.warmup} warm-up + {args.runs} interleaved rounds (A B, B A, ...) per repeat, "
        f"{args.repeats} repeats with fresh sessions; the candidate is a byte copy of the reference."),
        "",
        ("Produced by `python benchmarks/bench_self_ratio.py` "
        f"(onnxruntime {runtime.ort().__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {elapsed:.0f} s)."),
        "",
        (f"Load (`/proc/loadavg` 1/5/15 min) on {os.cpu_count()} CPUs: before `{load_before}`, after "
         f"`{load_after}`. The machine is shared with other engineers' processes."),
        "",
        "| repeat | original median ms | copy median ms | speed-up | 95% interval | per-round p10 | p50 | p90 |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for i, a, b, r in rows:
        lines.append(f"| {i} | {a:.4f} | {b:.4f} | {r.speedup:.4f} | {r.ci_low:.4f}-{r.ci_high:.4f} | "
                     f"{r.pair_p10:.3f} | {r.pair_p50:.3f} | {r.pair_p90:.3f} |")
    lines += [
        "",
        (f"Band: {lo:.2f}-{hi:.2f}. {inside} of {len(ratios)} ratios inside; ratios range "
        f"{min(ratios):.4f}-{max(ratios):.4f} (spread {max(ratios) - min(ratios):.4f}, "
        f"largest distance from 1: {max(abs(x - 1) for x in ratios):.4f})."),
        "",
        (f"95% intervals that contain 1.0: {sum(r.ci_low <= 1 <= r.ci_high for *_, r in rows)} of {len(rows)}; "
         f"the highest lower end is {max(r.ci_low for *_, r in rows):.4f}. `onnxshrink check` judges "
         "`min_speedup` on that lower end, so a copy of the model cannot pass a speed-up budget above it."),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
