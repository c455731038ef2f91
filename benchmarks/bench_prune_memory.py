"""Memory and time of pruning a model over 2 GB with external data, against one ONNX Runtime session of it.

The synthetic model of ``bench_bigmodel.py`` (12 dense layers, 2.25 GiB of float32 weights in
external data) is built in a temporary folder. Each configuration runs in a fresh interpreter (started
by ``bench_lossless.LAUNCHER``, so the peak resident set is its own; in this environment, BLAS on every
core):

- ``ort session``: ONNX Runtime opens the model and runs one feed: the memory any validation of the
  model needs, the anchor the others are read against;
- ``prune`` (Python API, data-free ``l1``, 0.3 of the channels, written with external data): peak
  anonymous memory (``RssAnon``, sampled every 20 ms: what the job itself holds, without the
  memory-mapped weights the kernel can drop) besides the peak resident set (``ru_maxrss``, which counts
  the mapped file pages read);
- ``cli``: ``onnxshrink optimize IN -o OUT --prune 0.3`` (``cli.main``), which also measures the pruned model's drift against
  the input on 4 random feeds with ONNX Runtime (both models over 1 GiB: one session at a time);
- ``refit, 32 rows``: ``prune`` with least-squares reconstruction on 32 calibration rows (a stacked
  .npz, one row per feed): fewer rows than the layers' inputs (8,608 and 2,872 after pruning), so each
  refit keeps the rows and solves in the dual (``onnxshrink.normal_eq.Rows``);
- ``refit, 9,216 rows``: the same on 18 feeds of 512 rows (a folder of .npz): more rows than inputs,
  so each layer accumulates its Gram matrix (8,609 squared with the bias: 593 MB in float64, twice,
  one per cross-validation half) and tries four ridges by LU solves. About 28 minutes on 2 cores,
  most of this script's time.

In both refit jobs the refit weights go to a temporary file mapped back (``onnxshrink.spill``) until the
save, so they count in the resident set while read but not in anonymous memory.

The pruned model is checked: it runs on ONNX Runtime and its output matches the same plan applied to
the model loaded into memory (``prune`` of the in-memory ``ModelProto``, whose weights are sliced
eagerly) exactly.

    python benchmarks/bench_prune_memory.py [--out benchmarks/results] [--skip-gram]

Writes ``prune_memory.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_bigmodel import big_feeds, build_big
from bench_lossless import run_measured

from benchmarks._common import kept_reading, write_results

PY = sys.executable
#: Samples RssAnon in a thread while the statement runs; prints the peak in MiB and the seconds.
SAMPLED = """
import json, threading, time
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon'):
            return int(line.split()[1]) / 1024
peak, done = [0.0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
extra = {{}}
{stmt}
done[0] = True
print('RESULT ' + json.dumps({{'anon_mib': max(peak[0], anon()), 'job_seconds': time.perf_counter() - t0, **extra}}))
"""
JOBS = {
    "ort session": ("import onnxruntime as ort, numpy as np\n"
                    "s = ort.InferenceSession({src!r}, providers=['CPUExecutionProvider'])\n"
                    "s.run(None, {{'x': np.zeros((2, 4096), np.float32)}})"),
    "prune": "import onnxshrink\nonnxshrink.prune({src!r}, 0.3, {out!r})",
    "cli": ("from onnxshrink.cli import main\n"
            "assert main(['optimize', {src!r}, '-o', {out!r}, '--prune', '0.3']) == 0"),
}
#: Pruning with reconstruction on calibration data ``{calib}``; ``extra`` records the refits taken.
REFIT = ("import onnxshrink\n"
         "r = onnxshrink.prune({src!r}, 0.3, {out!r}, calibration={calib!r}, reconstruct=True)\n"
         "fits = r.reconstruction['refit']\n"
         "extra = {{'refit': sum(f['ridge'] is not None for f in fits), 'layers': len(fits),\n"
         "          'rows': sorted({{f['rows'] for f in fits}})}}")
REFIT_JOBS = {"refit, 32 rows": "calib32.npz", "refit, 9,216 rows": "calib9216"}


def run_sampled(stmt: str, log: Path) -> tuple[dict, dict, list[str]]:
    """Run ``stmt`` in a fresh interpreter under ``SAMPLED``, in the user's environment (BLAS on every
    core) from the repo's folder: the job's row (exit code, seconds, peak RSS, peak anonymous MiB), the
    statement's ``RESULT`` record and the log's lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = run_measured([PY, "-c", SAMPLED.format(stmt=stmt)], log, 3600, env=env)
    lines = log.read_text(errors="replace").splitlines()
    res = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), {})
    row = {"rc": r["rc"], "seconds": round(r["seconds"], 1), "peak_rss_mib": round(r["peak_rss_mib"]),
           "anon_mib": round(res["anon_mib"]) if res else None}
    if r["rc"] != 0:
        row["error"] = " | ".join(r["log_tail"])[-300:]
    return row, res, lines


def run_job(name: str, src: Path, out: Path, log: Path) -> dict:
    if name in REFIT_JOBS:
        stmt = REFIT.format(src=str(src), out=str(out), calib=str(src.parent.parent / REFIT_JOBS[name]))
    else:
        stmt = JOBS[name].format(src=str(src), out=str(out))
    row, res, lines = run_sampled(stmt, log)
    row["drift_line"] = next((line.strip() for line in lines if "output drift against the unpruned" in line), None)
    if "refit" in res:
        row.update(refit=res["refit"], layers=res["layers"], rows=res["rows"])
    return row


def write_calibration(tmp: Path) -> None:
    """32 rows as one stacked .npz (a feed per row) and 18 feeds of 512 rows as a folder."""
    rng = np.random.default_rng(1)
    np.savez(tmp / "calib32.npz", x=rng.standard_normal((32, 4096), dtype=np.float32))
    (tmp / "calib9216").mkdir()
    for i in range(18):
        np.savez(tmp / "calib9216" / f"{i:02d}.npz", x=rng.standard_normal((512, 4096), dtype=np.float32))


def check_output(src: Path, out: Path) -> dict:
    """Run the pruned model and compare it with the same pruning done on the model in memory."""
    import onnx
    import onnxruntime as ort

    import onnxshrink

    feed = big_feeds()[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    eager = onnxshrink.prune(onnx.load(str(src)), 0.3)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        path = Path(tmp) / "eager.onnx"
        onnxshrink.model_io.save(eager.model, path, external_data=True)
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return {"shape": list(got.shape), "equal": bool(np.array_equal(got, want)),
            "output_bytes": sum(p.stat().st_size for p in out.parent.glob(out.name + "*"))}


def write_markdown(res: dict, path: Path) -> None:
    reading = kept_reading(path)
    gib = res["model_bytes"] / 2**30
    lines = ["# Pruning a model over 2 GB: memory and time", "",
             (f"`python benchmarks/bench_prune_memory.py` (see its docstring). Machine: {res['machine']}. "
              f"Model: `bench_bigmodel.py`'s, {gib:.2f} GiB with external data; pruned at 0.3 of the "
              f"channels (l1 magnitude; the refit jobs then refit the layers on calibration data) to "
              f"{res['check']['output_bytes'] / 2**30:.2f} GiB. Load "
              f"{res['load'][0]}-{res['load'][1]}."), "",
             ("`peak RSS`: the process's peak resident set (counts the memory-mapped weights it read); "
              "`peak anon`: its peak anonymous memory (what it holds itself), sampled every 20 ms; "
              "`/ model`: peak as a share of the model's size; `/ ORT`: peak RSS as a share of one ONNX "
              "Runtime session of the input."), "",
             "| job | seconds | peak RSS MiB | / model | / ORT | peak anon MiB | / model |",
             "|---|---|---|---|---|---|---|"]
    ort_rss = res["jobs"]["ort session"]["peak_rss_mib"]
    for name, j in res["jobs"].items():
        anon = "" if j["anon_mib"] is None else f"{j['anon_mib']} | {j['anon_mib'] * 2**20 / res['model_bytes']:.2f}"
        lines.append(f"| {name} | {j['seconds']} | {j['peak_rss_mib']} | "
                     f"{j['peak_rss_mib'] * 2**20 / res['model_bytes']:.2f} | {j['peak_rss_mib'] / ort_rss:.2f} | "
                     f"{anon or ' | '} |")
    c = res["check"]
    lines += ["", f"Pruned output {c['shape']}, equal to the in-memory pruning's: {'yes' if c['equal'] else 'no'}."]
    if drift := res["jobs"]["cli"].get("drift_line"):
        lines.append(f"CLI: {drift}")
    for name, j in res["jobs"].items():
        if "refit" in j:
            lines.append(f"{name}: {j['refit']} of {j['layers']} layers refit (the others kept their "
                         f"weights: the refit did not predict held-out rows better); rows per layer "
                         f"{', '.join(map(str, j['rows']))}.")
    path.write_text("\n".join(lines) + "\n" + reading)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--skip-gram", action="store_true", help="leave out the 28-minute 'refit, 9,216 rows' job")
    args = ap.parse_args(argv)
    from onnxshrink import ort_blocks

    res: dict = {"machine": ort_blocks.cpu_name(), "load": [round(os.getloadavg()[0], 2)], "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-prune-memory-") as t:
        tmp = Path(t)
        (tmp / "src").mkdir()
        src = build_big(tmp / "src" / "big.onnx")
        res["model_bytes"] = sum(p.stat().st_size for p in (tmp / "src").iterdir())
        write_calibration(tmp)
        names = [*JOBS, *REFIT_JOBS]
        for name in names[:-1] if args.skip_gram else names:
            out_dir = tmp / name.replace(" ", "_").replace(",", "")
            out_dir.mkdir()
            res["jobs"][name] = run_job(name, src, out_dir / "pruned.onnx", tmp / f"{out_dir.name}.log")
            print(name, res["jobs"][name], flush=True)
        res["check"] = check_output(src, tmp / "prune" / "pruned.onnx")
    write_results(res, args.out, "prune_memory", write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
