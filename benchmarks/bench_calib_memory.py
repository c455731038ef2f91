"""Peak memory of calibration against the number of samples: onnxshrink's observers beside ONNX Runtime's
``onnxruntime.quantization`` calibrators (MinMax, Entropy, Percentile) on the same model and data.

Every configuration runs in a fresh subprocess that reports its peak RSS (``VmHWM`` of
``/proc/self/status``) and wall time. The parent polls each worker's RSS and kills it above ``--cap-gb``
(reported as "killed at the cap"): ORT's Entropy and Percentile calibrators keep every tapped tensor of
every sample, which runs into many GB on a real detector. The data is written once as a folder of ``.npz``
files and read one feed at a time by both tools, so the data itself never sits in memory. A ``baseline``
worker (load the model, one inference) shows the floor. Wall times are informative only (default ORT
threading, single runs): memory is the subject.

Model: ``ppocr_det`` (PP-OCRv4 DB text detector, real weights, rendered text pages of 320x320) when
``models/fetch_real.py`` can fetch it, else ``ppocr_cls``, else the zoo's trained digits CNN.

    python benchmarks/bench_calib_memory.py [--model auto|ppocr_det|ppocr_cls|digits] [--n N]
        [--cap-gb 4] [--only ours:minmax,ort:MinMax]

Writes ``benchmarks/results/calib_memory.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
OURS = ("auto", "minmax", "ema", "percentile", "entropy", "mse")
ORTS = ("MinMax", "Entropy", "Percentile")
DEFAULT_N = {"ppocr_det": 2, "ppocr_cls": 4, "digits": 32}


# ------------------------------------------------------------------ data


def pick_model(name: str) -> str:
    if name != "auto":
        return name
    from models import fetch_real

    for candidate in ("ppocr_det", "ppocr_cls"):
        try:
            fetch_real.fetch(candidate)
            return candidate
        except fetch_real.FetchError as e:
            print(f"{candidate} unavailable ({e}); trying the next model", file=sys.stderr)
    return "digits"


def prepare(name: str, n: int, folder: Path) -> tuple[str, dict[int, str]]:
    """The model path and, for N and 10N samples, folders of one-feed .npz files."""
    if name == "digits":
        from models import digits

        path = str(digits.trained_path("cnn"))
        pool = digits.feeds("cnn", "calib", batch=1, limit=10 * n)
    else:
        from models import fetch_real

        path = str(fetch_real.fetch(name))
        # seeds 0, 3, 6... keep every detector page at the same size (320x320), so only the count varies
        pool = [fetch_real.example_feeds(name, 1, seed=3 * k)[0] for k in range(10 * n)]
    dirs = {}
    for count in (n, 10 * n):
        d = folder / f"data_{count}"
        d.mkdir()
        for i, feed in enumerate(pool[:count]):
            np.savez(d / f"{i:05d}.npz", **feed)
        dirs[count] = str(d)
    return path, dirs


# ------------------------------------------------------------------ workers (run in subprocesses)


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def _npz_feeds(folder: str):
    for f in sorted(Path(folder).glob("*.npz")):
        with np.load(f) as z:
            yield {k: z[k] for k in z.files}


def worker(tool: str, model: str, data_dir: str, scratch: str) -> dict:
    start = time.perf_counter()
    info: dict = {}
    if tool == "baseline":
        import onnxruntime as ort

        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        sess.run(None, next(_npz_feeds(data_dir)))
    elif tool == "ours:auto":  # what quantize's default method runs: one histogram run, two tables
        from onnxshrink.calibration import calibrate_methods

        tables = calibrate_methods(model, data_dir, methods=("minmax", "percentile"), cache_dir=False,
                                   progress=False)
        info = {"tensors": len(tables["minmax"]), "samples": tables["minmax"].samples}
    elif tool.startswith("ours:"):
        from onnxshrink.calibration import calibrate

        table = calibrate(model, data_dir, method=tool.split(":", 1)[1], cache_dir=False, progress=False)
        info = {"tensors": len(table), "samples": table.samples}
    else:
        info = _ort_worker(tool.split(":", 1)[1], model, data_dir, scratch)
    return {"peak_kb": _peak_kb(), "seconds": time.perf_counter() - start, **info}


def _ort_worker(method: str, model: str, data_dir: str, scratch: str) -> dict:
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = _npz_feeds(data_dir)

        def get_next(self):
            return next(self.it, None)

    cal = create_calibrator(model, None, str(Path(scratch) / "augmented.onnx"),
                            calibrate_method=getattr(CalibrationMethod, method))
    cal.collect_data(Reader())
    ranges = cal.compute_data()
    return {"tensors": len(ranges.data) if hasattr(ranges, "data") else len(ranges)}


# ------------------------------------------------------------------ driver


def run_one(tool: str, model: str, data_dir: str, cap_kb: int, timeout: float) -> dict:
    """Run a worker subprocess, watching its RSS; kill it above ``cap_kb`` or after ``timeout`` s."""
    with tempfile.TemporaryDirectory(prefix="calibmem-") as scratch:
        cmd = [sys.executable, __file__, "--worker", tool, model, data_dir, scratch]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        peak, start, killed = 0, time.monotonic(), None
        while proc.poll() is None:
            rss = _rss_kb(proc.pid)
            peak = max(peak, rss)
            if rss > cap_kb:
                killed = "cap"
            elif time.monotonic() - start > timeout:
                killed = "timeout"
            if killed:
                proc.kill()
                break
            time.sleep(0.05)
        out, err = proc.communicate()
    if killed:
        return {"killed": killed, "peak_kb": peak, "seconds": time.monotonic() - start}
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or ["?"])[-1][:200], "peak_kb": peak}
    return json.loads(out.strip().splitlines()[-1])


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _mb(result: dict, cap_gb: float) -> str:
    if "killed" in result:
        return f"> {cap_gb * 1024:.0f} (killed at the cap)" if result["killed"] == "cap" else "timeout"
    if "error" in result:
        return f"error: {result['error']}"
    return f"{result['peak_kb'] / 1024:.0f}"


def report(name: str, n: int, rows: dict, cap_gb: float) -> str:
    lines = [
        f"# Calibration peak memory: {name}, {n} vs {10 * n} samples",
        "",
        "Peak RSS (VmHWM) of a fresh process per configuration; every tool reads the same .npz folder one",
        "feed at a time. `ours:*` is `onnxshrink.calibration.calibrate` (min/max and EMA reduce each tensor",
        "inside the graph; percentile, entropy and mse stream each batch, at most 32 MiB of tapped tensors,",
        "into fixed-size histograms; `ours:auto`, `quantize`'s default, is one histogram run answering both",
        "min/max and percentile);",
        "`ort:*` is `onnxruntime.quantization.calibrate.create_calibrator` (MinMax reduces in the graph too;",
        "Entropy and Percentile keep every tapped tensor of every sample until the end).",
        "",
        f"| configuration | peak MB, {n} samples | peak MB, {10 * n} samples | ratio | s, {n} | s, {10 * n} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tool, (small, big) in rows.items():
        ok = all("peak_kb" in r and "killed" not in r and "error" not in r for r in (small, big))
        ratio = f"{big['peak_kb'] / small['peak_kb']:.2f}" if ok else ("> %.1f" % (
            big["peak_kb"] / small["peak_kb"]) if "killed" in big and "peak_kb" in small else "-")
        secs = [f"{r['seconds']:.1f}" if "seconds" in r and "killed" not in r else "-" for r in (small, big)]
        lines.append(f"| {tool} | {_mb(small, cap_gb)} | {_mb(big, cap_gb)} | {ratio} | {secs[0]} | {secs[1]} |")
    lines += ["", f"Cap: workers are killed above {cap_gb:g} GiB RSS. Python: {sys.version.split()[0]}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto")
    ap.add_argument("--n", type=int, default=None, help="samples in the small run (the big one has 10x)")
    ap.add_argument("--cap-gb", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--only", default="", help="comma-separated configurations, e.g. ours:minmax,ort:MinMax")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    name = pick_model(args.model)
    n = args.n or DEFAULT_N.get(name, 4)
    tools = ["baseline", *(f"ours:{m}" for m in OURS), *(f"ort:{m}" for m in ORTS)]
    if args.only:
        tools = [t for t in tools if t in args.only.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="calibmem-data-") as tmp:
        model, dirs = prepare(name, n, Path(tmp))
        for tool in tools:
            rows[tool] = tuple(run_one(tool, model, dirs[c], int(args.cap_gb * 2**20), args.timeout)
                               for c in (n, 10 * n))
            print(tool, [_mb(r, args.cap_gb) for r in rows[tool]], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = report(name, n, rows, args.cap_gb)
    (RESULTS / "calib_memory.md").write_text(text)
    (RESULTS / "calib_memory.json").write_text(json.dumps({"model": name, "n": n, "rows": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
