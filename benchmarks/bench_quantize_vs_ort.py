"""onnxshrink's int8 QDQ against ``onnxruntime.quantization.quantize_static`` (QDQ, per channel), one run.

Every quantizer gets the same float model and the same calibration feeds and runs in its own fresh
process (so its wall time and peak RSS are its own). ORT is run with MinMax, Entropy and Percentile,
with int8 (S8S8, its default) and uint8 (U8S8) activations; onnxshrink with its defaults (minmax,
activations chosen for this CPU) and with percentile / entropy. Columns:

- ``metric``: digits test accuracy for the trained classifiers; for the others, agreement with the float
  model on held-out feeds (argmax for classifiers, speech decision > 0.5 for the VAD, sign for others);
- ``drift``: 1 - mean cosine similarity of the outputs to the float model's;
- ``speedup``: float latency / int8 latency, 1 thread, the two sessions interleaved (``onnxshrink.bench``);
- ``size``: file size / float file size; ``quant_s``: wall time of the quantizer process;
- ``rss_mib``: the quantizer process's peak RSS.

    /work/venv/bin/python benchmarks/bench_quantize_vs_ort.py [--models digits:cnn real:ppocr_cls ...]
        [--runs 100] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ["digits:cnn", "digits:resnet", "digits:mobilenet", "digits:vit", "zoo:mobilenetv2",
          "zoo:transformer", "real:ppocr_cls", "real:silero_vad"]
OURS = [("onnxshrink", {"method": "minmax"}), ("onnxshrink", {"method": "percentile"}),
        ("onnxshrink", {"method": "entropy"})]
ORT = [("ort", {"method": m, "activations": a}) for m in ("MinMax", "Entropy", "Percentile")
       for a in ("QInt8", "QUInt8")]


# ---------------------------------------------------------------- data


def prepare(spec: str, tmp: Path) -> dict:
    """Float model path, calibration feeds (saved as an .npz folder), evaluation feeds and labels."""
    kind, name = spec.split(":")
    labels = None
    if kind == "digits":
        from models import digits

        src = digits.trained_path(name)
        calib = digits.feeds(name, "calib", batch=32)
        x, labels = digits.model_input(name, "test")
        evals = [{"input": x[i:i + 60]} for i in range(0, len(x), 60)]
    elif kind == "zoo":
        from models import zoo
        from onnxshrink import data, model_io

        src = zoo.save(name, tmp)
        specs = data.input_specs(model_io.load(src))
        calib = [data.random_feed(specs, i, {d: 4 for s in specs for d in s.dims if isinstance(d, str)})
                 for i in range(32)]
        evals = [data.random_feed(specs, 1000 + i, {d: 4 for s in specs for d in s.dims if isinstance(d, str)})
                 for i in range(8)]
    else:
        from models import fetch_real

        src = fetch_real.fetch(name)
        calib = fetch_real.example_feeds(name, n=32, seed=0)
        evals = fetch_real.example_feeds(name, n=16, seed=1)
    calib_dir = tmp / f"{spec.replace(':', '_')}_calib"
    calib_dir.mkdir()
    for i, feed in enumerate(calib):
        np.savez(calib_dir / f"{i:04d}.npz", **feed)
    return {"spec": spec, "src": str(src), "calib_dir": str(calib_dir), "evals": evals, "labels": labels}


# ---------------------------------------------------------------- worker (one quantizer, own process)


def worker(job: dict) -> dict:
    t0 = time.perf_counter()
    if job["tool"] == "onnxshrink":
        from onnxshrink.quantize import quantize

        quantize(job["src"], job["calib_dir"], job["out"], method=job["method"], cache_dir=False)
    else:
        _ort_quantize(job)
    return {"seconds": time.perf_counter() - t0,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _ort_quantize(job: dict) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, folder):
            self.files = sorted(Path(folder).glob("*.npz"))

        def get_next(self):
            if not self.files:
                return None
            with np.load(self.files.pop(0)) as z:
                return {k: z[k] for k in z.files}

    quantize_static(job["src"], job["out"], Reader(job["calib_dir"]), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=getattr(QuantType, job["activations"]),
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, job["method"]))


def run_worker(job: dict, timeout: int = 1800) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], check=False, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- evaluation


def evaluate(prep: dict, path: str, float_outs, runs: int) -> dict:
    from onnxshrink import bench
    from onnxshrink.runtime import make_session

    try:
        sess = make_session(path, threads=1)
        outs = [sess.run(None, f) for f in prep["evals"]]
    except Exception as e:  # noqa: BLE001 - an invalid quantized model is a result
        return {"error": f"ORT cannot run it: {str(e)[:160]}"}
    cos = [_cos(a[0], b[0]) for a, b in zip(float_outs, outs)]
    row = {"metric": round(_metric(prep, float_outs, outs), 4), "drift": float(f"{1 - np.mean(cos):.3g}")}
    ratio = bench.measure([prep["src"], path], [prep["evals"][0]], runs=runs, warmup=10).providers["cpu"].ratio
    row["speedup"] = round(ratio.speedup, 3)
    row["size"] = round(Path(path).stat().st_size / Path(prep["src"]).stat().st_size, 3)
    return row


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _metric(prep: dict, float_outs, outs) -> float:
    if prep["labels"] is not None:
        pred = np.concatenate([o[0].argmax(-1) for o in outs])
        return float((pred == prep["labels"]).mean())
    ref = np.concatenate([o[0].reshape(len(o[0]), -1) for o in float_outs])
    got = np.concatenate([o[0].reshape(len(o[0]), -1) for o in outs])
    if prep["spec"] == "real:silero_vad":
        return float(((ref > 0.5) == (got > 0.5)).mean())
    if ref.shape[1] > 1:
        return float((ref.argmax(-1) == got.argmax(-1)).mean())
    return float((np.sign(ref) == np.sign(got)).mean())


def bench_model(spec: str, runs: int, tmp: Path) -> list[dict]:
    from onnxshrink.runtime import make_session

    prep = prepare(spec, tmp)
    sess = make_session(prep["src"], threads=1)
    float_outs = [sess.run(None, f) for f in prep["evals"]]
    rows = [{"model": spec, "tool": "float", "config": "-",
             "metric": round(_metric(prep, float_outs, float_outs), 4), "drift": 0.0, "speedup": 1.0}]
    for i, (tool, cfg) in enumerate(OURS + ORT):
        out = str(tmp / f"{spec.replace(':', '_')}_{i}.onnx")
        job = {"tool": tool, "src": prep["src"], "calib_dir": prep["calib_dir"], "out": out, **cfg}
        row = {"model": spec, "tool": tool, "config": "/".join(cfg.values())}
        res = run_worker(job)
        if "error" in res:
            row["error"] = res["error"]
        else:
            row.update(quant_s=round(res["seconds"], 2), rss_mib=round(res["rss_mib"]))
            row.update(evaluate(prep, out, float_outs, runs))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def to_markdown(rows: list[dict]) -> str:
    cols = ["model", "tool", "config", "metric", "drift", "speedup", "size", "quant_s", "rss_mib", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-q-") as tmp:
        for spec in args.models:
            try:
                rows += bench_model(spec, args.runs, Path(tmp))
            except Exception as e:  # noqa: BLE001 - a model that cannot be fetched is reported, not fatal
                rows.append({"model": spec, "tool": "-", "error": f"{type(e).__name__}: {str(e)[:160]}"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize_vs_ort.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "quantize_vs_ort.md").write_text(to_markdown(rows))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
