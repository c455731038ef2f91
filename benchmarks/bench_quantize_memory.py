"""Memory and time of quantizing a model over 2 GB with external data, against ONNX Runtime's quantizer.

The synthetic model of ``bench_bigmodel.py`` (12 dense layers, 2.25 GiB of float32 weights in
external data) is built in a temporary folder, with 4 calibration feeds of 8 rows. Each job runs in a
fresh interpreter (``bench_lossless.LAUNCHER``: the peak resident set is its own; BLAS on every core,
as a user would run it), its anonymous memory sampled every 20 ms (``bench_prune_memory.SAMPLED``):

- ``ort session``: ONNX Runtime opens the float model and runs one feed, the memory any validation of
  the model needs;
- ``onnxshrink dynamic``: ``onnxshrink.quantize(..., mode="dynamic")`` (int8 weights, dynamic
  activations; then its drift check on the calibration feeds);
- ``onnxshrink default``: ``onnxshrink.quantize`` with its defaults (static QDQ; calibration ranges,
  bias correction and the weights' encoding chosen by drift among the candidates ``calib_select``
  builds; placement tuning is skipped over 512 MiB);
- ``ORT quantize_dynamic`` and ``ORT quantize_static`` (QDQ, per channel, MinMax, the same feeds):
  ONNX Runtime's ``onnxruntime.quantization`` with ``use_external_data_format=True``.

Each output is then run on ONNX Runtime on one feed and compared with the float model
(``1 - cosine``).

    python benchmarks/bench_quantize_memory.py [--out benchmarks/results]

Writes ``quantize_memory.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_bigmodel import build_big
from bench_prune_memory import run_sampled

from benchmarks._common import kept_reading, write_results

FEEDS, ROWS = 4, 8
_READER = ("import glob, numpy as np\n"
           "from onnxruntime.quantization import CalibrationDataReader\n"
           "class Reader(CalibrationDataReader):\n"
           "    def __init__(self):\n"
           "        self.it = iter([dict(np.load(p)) for p in sorted(glob.glob({calib!r} + '/*.npz'))])\n"
           "    def get_next(self):\n"
           "        return next(self.it, None)\n")
JOBS = {
    "ort session": ("import onnxruntime as ort, numpy as np\n"
                    "s = ort.InferenceSession({src!r}, providers=['CPUExecutionProvider'])\n"
                    "s.run(None, {{'x': np.zeros((2, 4096), np.float32)}})"),
    "onnxshrink dynamic": "import onnxshrink\nonnxshrink.quantize({src!r}, {calib!r}, {out!r}, mode='dynamic')",
    "onnxshrink default": "import onnxshrink\nonnxshrink.quantize({src!r}, {calib!r}, {out!r})",
    "ORT quantize_dynamic": ("from onnxruntime.quantization import quantize_dynamic\n"
                             "quantize_dynamic({src!r}, {out!r}, use_external_data_format=True)"),
    "ORT quantize_static": (_READER + "from onnxruntime.quantization import QuantFormat, quantize_static\n"
                            "quantize_static({src!r}, {out!r}, Reader(), quant_format=QuantFormat.QDQ, "
                            "per_channel=True, use_external_data_format=True)"),
}


def write_calibration(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(FEEDS):
        np.savez(folder / f"{i:02d}.npz", x=rng.standard_normal((ROWS, 4096), dtype=np.float32))


def run_job(name: str, src: Path, out: Path, calib: Path, log: Path) -> dict:
    row, _, _ = run_sampled(JOBS[name].format(src=str(src), out=str(out), calib=str(calib)), log)
    if out.exists():
        row["output_bytes"] = sum(p.stat().st_size for p in out.parent.iterdir())
    return row


def drifts(src: Path, outs: dict[str, Path], calib: Path) -> dict[str, float]:
    """``1 - cosine`` (``validate.flat_drift``) of each output against the float model on the first
    calibration feed."""
    from onnxshrink.runtime import make_session
    from onnxshrink.validate import flat_drift, flat_floats

    feed = dict(np.load(min(calib.glob("*.npz"))))
    ref = flat_floats(make_session(src).run(None, feed))
    return {name: round(flat_drift(ref, flat_floats(make_session(path).run(None, feed))), 6)
            for name, path in outs.items()}


def write_markdown(res: dict, path: Path) -> None:
    reading = kept_reading(path)
    model = res["model_bytes"]
    ort_rss = res["jobs"]["ort session"]["peak_rss_mib"]
    lines = ["# Quantizing a model over 2 GB: memory and time", "",
             (f"`python benchmarks/bench_quantize_memory.py` (see its docstring). Machine: {res['machine']}. "
              f"Model: `bench_bigmodel.py`'s, {model / 2**30:.2f} GiB with external data; {FEEDS} calibration "
              f"feeds of {ROWS} rows. Load {res['load'][0]}-{res['load'][1]}."), "",
             ("`peak RSS`: the process's peak resident set (counts the memory-mapped weights it read); "
              "`peak anon`: its peak anonymous memory (what it holds itself), sampled every 20 ms; "
              "`/ model`: as a share of the model's size; `/ ORT`: peak RSS over one ONNX Runtime session "
              "of the input; `drift`: 1 - cosine of the output against the float model's on one feed."), "",
             "| job | seconds | peak RSS MiB | / ORT | peak anon MiB | / model | output MiB | drift |",
             "|---|---|---|---|---|---|---|---|"]
    for name, j in res["jobs"].items():
        anon = "" if j["anon_mib"] is None else f"{j['anon_mib']} | {j['anon_mib'] * 2**20 / model:.2f}"
        size = f"{j['output_bytes'] / 2**20:.0f}" if "output_bytes" in j else ""
        drift = res["drift"].get(name, "")
        lines.append(f"| {name} | {j['seconds']} | {j['peak_rss_mib']} | {j['peak_rss_mib'] / ort_rss:.2f} | "
                     f"{anon or ' | '} | {size} | {drift} |")
    for name, j in res["jobs"].items():
        if "error" in j:
            lines.append(f"\n{name} failed (exit {j['rc']}): `{j['error']}`")
    path.write_text("\n".join(lines) + "\n" + reading)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from onnxshrink import ort_blocks

    res: dict = {"machine": ort_blocks.cpu_name(), "load": [round(os.getloadavg()[0], 2)], "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-memory-") as t:
        tmp = Path(t)
        (tmp / "src").mkdir()
        src = build_big(tmp / "src" / "big.onnx")
        res["model_bytes"] = sum(p.stat().st_size for p in (tmp / "src").iterdir())
        calib = tmp / "calib"
        write_calibration(calib)
        outs = {}
        for name in JOBS:
            out_dir = tmp / name.replace(" ", "_")
            out_dir.mkdir()
            out = out_dir / "q.onnx"
            res["jobs"][name] = run_job(name, src, out, calib, tmp / f"{out_dir.name}.log")
            if name != "ort session" and res["jobs"][name]["rc"] == 0 and out.exists():
                outs[name] = out
            print(name, res["jobs"][name], flush=True)
        res["drift"] = drifts(src, outs, calib)
    write_results(res, args.out, "quantize_memory", write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
