"""Start-up cost of a CLI call: where the fixed second goes, and what the ml_dtypes bound buys.

onnx and onnx-ir import ml_dtypes on every start. This script times, each in a fresh interpreter,
interleaved over ``--repeats`` rounds (medians):

- for each ml_dtypes version in ``--versions``, in a throwaway venv (made once under ``--venvs``, default
  ``~/.cache/onnxshrink/startup-venvs``) holding that version, this venv's numpy, onnx, onnx-ir and
  onnxruntime, and onnxshrink from this tree: ``import ml_dtypes``, and ``onnxshrink optimize`` of the
  digits MLP (a 5-node model: the call is nearly all start-up);
- in this venv: ``import numpy``, ``import onnx``, ``import sympy`` (onnx-ir 1.1 imports it on start),
  ``import onnx_ir`` and ``import onnxruntime``.

    python benchmarks/bench_startup.py [--versions 0.6.0,0.7.0] [--repeats 7] [--out DIR]

Writes ``startup.md`` and ``startup.json`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import kept_reading, write_results


def venv_for(version: str, root: Path) -> Path:
    """A venv with ml_dtypes ``version``, this venv's numpy, onnx, onnx-ir, onnxruntime and networkx, and
    onnxshrink from this tree (installed without dependencies, so the ml_dtypes bound does not apply)."""
    from importlib.metadata import version as installed

    path = root / f"ml_dtypes-{version}"
    python = path / "bin" / "python"
    if not (path / "complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
        pins = [f"{p}=={installed(p)}" for p in ("numpy", "onnx", "onnx-ir", "onnxruntime", "networkx")]
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *pins, "typing_extensions", "sympy", "protobuf", "packaging", "flatbuffers"],
                       check=True)
        subprocess.run([*pip, "--no-deps", f"ml_dtypes=={version}"], check=True)
        with tempfile.TemporaryDirectory() as tmp:  # build outside the tree
            subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, cwd=tmp)
        (path / "complete").touch()
    return python


def seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    # outside the tree: ``-m onnxshrink.cli`` from the repo root would import its source folder
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   cwd=tempfile.gettempdir())
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", default="0.6.0,0.7.0")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--venvs", type=Path, default=Path.home() / ".cache" / "onnxshrink" / "startup-venvs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import ml_dtypes

    args.venvs.mkdir(parents=True, exist_ok=True)
    out_model = Path(tempfile.mkdtemp(prefix="startup-")) / "mlp.opt.onnx"
    mlp = str(ROOT / "models" / "digits" / "mlp.onnx")
    jobs = {}
    for v in args.versions.split(","):
        python = str(venv_for(v, args.venvs))
        jobs[f"import ml_dtypes, ml_dtypes {v}"] = [python, "-c", "import ml_dtypes"]
        jobs[f"onnxshrink optimize digits MLP, ml_dtypes {v}"] = [
            python, "-m", "onnxshrink.cli", "-q", "optimize", mlp, "-o", str(out_model)]
    here = f"this venv (ml_dtypes {ml_dtypes.__version__})"
    for mod in ("numpy", "onnx", "sympy", "onnx_ir", "onnxruntime"):
        jobs[f"import {mod}, {here}"] = [sys.executable, "-c", f"import {mod}"]
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(args.repeats):
        for name, cmd in jobs.items():
            times[name].append(seconds(cmd))
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "repeats": args.repeats, "load": [round(os.getloadavg()[0], 2)],
           "medians_s": {k: statistics.median(v) for k, v in times.items()}, "all_s": times}
    write_results(res, args.out, "startup", write_markdown)
    return 0


def write_markdown(res: dict, path: Path) -> None:
    reading = kept_reading(path)
    lines = ["# Start-up cost of a call", "",
             (f"`python benchmarks/bench_startup.py` ({res['date']}): each line a fresh interpreter, "
             f"{res['repeats']} interleaved rounds, medians; load average {res['load'][0]} -> {res['load'][-1]} "
             "(2 shared cores)."), "", "| what | median s |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in res["medians_s"].items()]
    path.write_text("\n".join(lines) + "\n" + reading)


if __name__ == "__main__":
    sys.exit(main())
