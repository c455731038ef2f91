"""onnxshrink structured pruning on real trained models (PP-OCR cls, rec, det; NudeNet YOLOv8n; PP-OCRv6
rec and det), without training.

For each model (``models/fetch_real.py``: the RapidOCR wheel's PP-OCR text-line orientation
classifier, recognizer and DB detector; NudeNet's YOLOv8n detector; rapidocr 3.10's PP-OCRv6 small
recognizer and detector, fed and scored like their v4 namesakes) and ratio (0.1, 0.3, 0.5), with the default rounding
(ONNX Runtime's NCHWc block):

- ``l1``: data-free, ``--prune RATIO`` (the L1 criterion, no calibration, no reconstruction);
- ``recon+lsq``: ``--prune-criterion reconstruction --reconstruct`` (least-squares refit) on
  calibration feeds;
- ``latency``: the same with ``--prune-target latency`` (RATIO of the estimated latency, widths
  chosen per group); a budget the planner cannot reach is reported as such.

Data: ``fetch_real.example_feeds`` (synthetic rendered text lines / pages / scenes; no labels): calibration
from seed 0, evaluation from seed 1. Quality is agreement with the unpruned float model on the
evaluation feeds: top-1 for cls, per-step arg-max for rec, text/no-text at 0.3 per pixel for det
(as ``bench_quantize_vs_ort.metric``), for NudeNet the Jaccard index of the above-0.2 (anchor, class)
pairs (as there) and, as ``fg``, the cosine of its class scores alone, plus ``fg`` (rec: arg-max agreement on the steps where the
float model emits a character, not the CTC blank; det: IoU of the text pixels) and the cosine of
the output flattened over all evaluation feeds. MACs are taken at the operating size (cls 48x192,
rec 48x320, det and NudeNet 320x320; batch 1).

Latency: ONNX Runtime CPU, 1 thread, ``onnxshrink.bench.measure`` (two sessions, runs interleaved,
order flipping every round). The reference is the unpruned model after onnxshrink's cleanup and
lossless passes (``prune`` at ratio 0, the same passes every pruned model gets), so the speed-up is
pruning's own; the cleanup's speed-up over the model as shipped is measured the same way once per
model. Batches: cls 1 and 32, rec 1 and 8 (one batch-32 run takes about 1 s here), det 1 at 320x320,
NudeNet 1 and 8.
The 1-minute load average is recorded before and after each model's timing (2 shared cores).

    /work/venv/bin/python benchmarks/bench_prune_real.py [--models ppocr_cls,ppocr_rec,ppocr_det,nudenet_320n,...]
        [--ratios 0.1,0.3,0.5] [--runs-scale 1.0] [--out benchmarks/results] [--stem prune_real] [--merge]
    /work/venv/bin/python benchmarks/bench_prune_real.py --render benchmarks/results/prune_real.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import kept_reading
from benchmarks.bench_prune import kept_text, machine
from models import fetch_real
from onnxshrink import bench, pruning, runtime
from onnxshrink.errors import ConfigError
from onnxshrink.validate import flat_drift, flat_floats


@dataclasses.dataclass(frozen=True)
class Spec:
    dims: dict  # operating size (input:axis -> size), batch left at 1
    calib: int  # calibration feeds (seed 0)
    evals: int  # evaluation feeds (seed 1)
    runs: dict  # batch -> timed rounds


MODELS = {
    "ppocr_cls": Spec({"x:2": 48, "x:3": 192}, 16, 16, {1: 200, 32: 40}),  # 6 crops a feed
    "ppocr_rec": Spec({"x:2": 48, "x:3": 320}, 8, 32, {1: 60, 8: 20}),  # 2 crops a feed
    "ppocr_det": Spec({"x:2": 320, "x:3": 320}, 6, 6, {1: 40}),  # 1 page a feed, 3 page sizes
    "ppocr6_rec": Spec({"x:2": 48, "x:3": 320}, 8, 32, {1: 60, 8: 20}),  # PP-OCRv6, fed as v4
    "ppocr6_det": Spec({"x:2": 320, "x:3": 320}, 6, 6, {1: 40}),
    "nudenet_320n": Spec({"images:2": 320, "images:3": 320}, 8, 16, {1: 60, 8: 15}),  # 1 scene a feed
}
#: Detectors, scored by ``fetch_real.detection_agreement`` as ``bench_quantize_vs_ort`` scores them.
DETECTORS = ("nudenet_320n",)
VARIANTS = {
    "l1": {"criterion": "l1"},
    "recon+lsq": {"criterion": "reconstruction", "reconstruct": "lsq"},
    "latency": {"criterion": "reconstruction", "reconstruct": "lsq", "target": "latency"},
}


# ---------------------------------------------------------------- quality


def quality(name: str, ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """Task agreement, foreground agreement (rec/det) and output cosine over all evaluation feeds."""
    flat_r, flat_g = flat_floats(ref), flat_floats(got)
    out = {"cos": 1.0 - flat_drift(flat_r, flat_g)}
    if name in DETECTORS:
        ref_outs, outs = [[o] for o in ref], [[o] for o in got]  # one output a feed
        out["agree"] = fetch_real.detection_agreement(name, ref_outs, outs)
        scores = fetch_real.DETECTIONS[name][1]
        sr, sg = (np.concatenate([scores(o).ravel() for o in x]) for x in (ref_outs, outs))
        out["fg"] = 1.0 - flat_drift(flat_floats([sr]), flat_floats([sg]))  # the class scores' cosine alone
        return out
    if name in ("ppocr_det", "ppocr6_det"):
        tr, tg = flat_r.values > 0.3, flat_g.values > 0.3
        out["agree"] = float((tr == tg).mean())
        out["fg"] = float((tr & tg).sum() / max((tr | tg).sum(), 1))
        return out
    last = ref[0].shape[-1]
    ar, ag = (np.concatenate([o.reshape(-1, last) for o in x]).argmax(-1) for x in (ref, got))
    out["agree"] = float((ar == ag).mean())
    if name in ("ppocr_rec", "ppocr6_rec"):
        chars = ar != 0  # CTC blank is class 0
        out["fg"] = float((ar[chars] == ag[chars]).mean()) if chars.any() else None
        out["fg_steps"] = int(chars.sum())
    return out


def outputs(path: str, feeds: list[dict]) -> list[np.ndarray]:
    sess = runtime.make_session(path, threads=1)
    return [sess.run(None, f)[0] for f in feeds]


# ---------------------------------------------------------------- latency


def timing_feeds(name: str, spec: Spec, evals: list[dict]) -> dict[int, dict]:
    """Per timed batch, one feed at the operating size built from the evaluation feeds."""
    x = next(iter(evals[0]))  # the image input
    h, w = spec.dims[f"{x}:2"], spec.dims[f"{x}:3"]
    rows = np.concatenate([f[x] for f in evals if f[x].shape[2:] == (h, w)])
    if name in ("ppocr_det", "ppocr6_det") and not len(rows):
        rows = fetch_real.example_feeds(name, n=1, seed=0)[0][x]  # seed 0 starts at 320x320
    out = {}
    for b in spec.runs:
        reps = -(-b // len(rows))
        out[b] = {x: np.ascontiguousarray(np.concatenate([rows] * reps)[:b])}
    return out


def speedup(ref: str, cand: str, feed: dict, runs: int) -> dict:
    rep = bench.measure([ref, cand], [feed], runs=runs, warmup=5, labels=["reference", "candidate"])
    cpu = rep.providers["cpu"]
    r = cpu.ratio
    return {"speedup": r.speedup, "ci": [r.ci_low, r.ci_high],
            "ms": [m.latency.median_ms for m in cpu.models]}


# ---------------------------------------------------------------- one model


def prune_variant(src: str, ratio: float, label: str, spec: Spec, calib, out: Path) -> dict:
    opts = dict(VARIANTS[label])
    t0 = time.perf_counter()
    try:
        res = pruning.prune(src, ratio, out, dims=spec.dims,
                            calibration=None if label == "l1" else calib, **opts)
    except ConfigError as e:
        return {"error": str(e)}
    plan = res.plan
    est = plan.settings.get("estimate") or {}
    recon = res.reconstruction or {}
    return {"seconds": round(time.perf_counter() - t0, 1), "path": str(out),
            "params": [res.before["parameters"], res.after["parameters"]],
            "macs": [res.before["macs"], res.after["macs"]], "est_latency_us": est.get("latency_us"),
            "status": plan.summary()["status"], "text": plan.target_text(), "check": plan.settings.get("check"),
            "refit": len(recon.get("refit", [])), "bn": len(recon.get("bn", [])),
            "widths": [[g.atoms * g.channels_per_atom, g.kept_channels] for g in plan.groups
                       if g.status in ("pruned", "unchanged")]}


def run_model(name: str, ratios, runs_scale: float) -> dict:
    spec = MODELS[name]
    src = str(fetch_real.fetch(name))
    calib = fetch_real.example_feeds(name, n=spec.calib, seed=0)
    evals = fetch_real.example_feeds(name, n=spec.evals, seed=1)
    ref_out = outputs(src, evals)
    entry: dict = {"dims": spec.dims, "calib_feeds": spec.calib, "eval_feeds": spec.evals, "rows": [],
                   "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory(prefix="bench-prune-real-") as tmp:
        cleaned = str(Path(tmp) / "cleaned.onnx")
        base = pruning.prune(src, 0.0, cleaned, dims=spec.dims)
        entry["blocked"] = sorted({g.stops[0] for g in base.plan.groups if g.status == "blocked"})
        entry["groups"] = base.plan.summary()["status"]
        for ratio in ratios:
            for label in VARIANTS:
                row = {"ratio": ratio, "variant": label,
                       **prune_variant(src, ratio, label, spec, calib, Path(tmp) / f"{ratio}_{label}.onnx")}
                if "error" not in row:
                    row.update(quality(name, ref_out, outputs(row["path"], evals)))
                print(f"  {name} {ratio} {label}: " + json.dumps({k: v for k, v in row.items()
                      if k in ("agree", "fg", "cos", "macs", "seconds", "error")}), flush=True)
                entry["rows"].append(row)
        _time_all(name, spec, evals, src, cleaned, entry, runs_scale)
    for row in entry["rows"]:
        row.pop("path", None)
    return entry


#: What the first results (prune_real.json, before models carried their machine) were measured on.
FIRST_MACHINE = {"cpu": "Intel Xeon (AVX-512)", "nchwc_block": 16}


def _time_all(name: str, spec: Spec, evals, src: str, cleaned: str, entry: dict, runs_scale: float) -> None:
    feeds = timing_feeds(name, spec, evals)
    load = [round(os.getloadavg()[0], 2)]
    runs = {b: max(int(r * runs_scale), 10) for b, r in spec.runs.items()}
    entry["cleanup"] = {b: speedup(src, cleaned, feeds[b], runs[b]) for b in feeds}
    for row in entry["rows"]:
        if "error" in row:
            continue
        row["timing"] = {b: speedup(cleaned, row["path"], feeds[b], runs[b]) for b in feeds}
        print(f"  {name} {row['ratio']} {row['variant']}: speed-up "
              + ", ".join(f"b{b} {t['speedup']:.2f}x" for b, t in row["timing"].items()), flush=True)
    load.append(round(os.getloadavg()[0], 2))
    entry["load"] = load
    entry["runs"] = runs


# ---------------------------------------------------------------- report


def _pct(pair) -> str:
    return f"{100.0 * (1 - pair[1] / pair[0]):.0f}%"


def _x(pair) -> float:
    return pair[0] / max(pair[1], 1)


def _fmt(v, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def _row(name: str, r: dict, batches) -> str:
    kept = kept_text(r.get("check"))
    head = f"| {name} | {r['ratio']} | {r['variant']}{', kept ' + kept if kept else ''} |"
    if "error" in r:
        return head + f" {r['error'][:150]} |" + " |" * (9 + 2 * len(batches))
    est = r.get("est_latency_us")
    est_x = f"{est[0] / est[1]:.2f}x" if est else ""
    t = r.get("timing", {})
    speeds = [f"{t[b]['speedup']:.2f}x" if b in t else "" for b in batches]
    share = [f"{100 * t[b]['speedup'] / _x(r['macs']):.0f}%" if b in t else "" for b in batches]
    ms = " / ".join(f"{t[b]['ms'][0]:.3g} -> {t[b]['ms'][1]:.3g}" for b in batches if b in t)
    return (f"{head} {_pct(r['params'])} | {_pct(r['macs'])} | {_x(r['macs']):.2f}x | {est_x} | "
            f"{100 * r['agree']:.1f} | {_fmt(r.get('fg') and 100 * r['fg'], '.2f' if name in DETECTORS else '.1f')} | {r['cos']:.4f} | "
            + " | ".join(speeds) + " | " + " | ".join(share) + f" | {ms} | {r['seconds']} |")


def _model_lines(name: str, e: dict) -> list[str]:
    batches = [int(b) for b in e["runs"]]
    cleanup = ", ".join(f"b{b} {e['cleanup'][b]['speedup']:.2f}x" for b in batches)
    m = e.get("machine", FIRST_MACHINE)
    lines = [
        f"### {name}",
        "",
        (f"{m['cpu']}{', ' + e['date'] if 'date' in e else ''}. Operating size {', '.join(f'{k}={v}' for k, v in e['dims'].items())}; {e['calib_feeds']} calibration / "
         f"{e['eval_feeds']} evaluation feeds; groups: "
         f"{', '.join(f'{n} {s}' for s, n in e['groups'].items())}. Cleanup and lossless passes alone (the "
         f"reference below) over the model as shipped: {cleanup}. Load {e['load'][0]}-{e['load'][1]}; "
         f"timed rounds {', '.join(f'b{b}: {n}' for b, n in e['runs'].items())}."),
        "",
    ]
    if e.get("blocked"):
        lines += ["Blocked groups stop at: " + "; ".join(f"`{s}`" for s in e["blocked"]), ""]
    hb = " | ".join(f"b{b}" for b in batches)
    hs = " | ".join(f"b{b} of x MACs" for b in batches)
    lines += [(f"| model | ratio | variant | -params | -MACs | x MACs | est | agree | fg | cos | {hb} | {hs} | "
               "ms (ref -> pruned) | prune s |"),
              "|---" * (14 + 2 * (len(batches) - 1)) + "|"]
    lines += [_row(name, r, batches) for r in e["rows"]]
    return lines + [""]


def write_markdown(results: dict, path: Path) -> None:
    reading = kept_reading(path)
    machines = {(m["cpu"], m["nchwc_block"]) for m in (e.get("machine", FIRST_MACHINE) for e in results.values())}
    where = "; ".join(f"{cpu}: NCHWc block {block}" for cpu, block in sorted(machines))
    lines = [
        ("# Structured pruning on real trained models: PP-OCR cls, rec, det, NudeNet YOLOv8n, PP-OCRv6 rec, "
         "det (no training)"),
        "",
        ("`python benchmarks/bench_prune_real.py` (see its docstring). Widths rounded to the default (ONNX "
         f"Runtime's NCHWc block; {where}; rounded up: a narrow group may stay whole). Variants: "
         "`l1` data-free; `recon+lsq` = `--prune-criterion reconstruction --reconstruct` on the calibration feeds; "
         "`latency` = the same with `--prune-target latency` (RATIO of the estimated latency; where the "
         "uniform check ran, the variant says which plan it kept, the allocated widths or the uniform plan "
         "fitting the same estimate, with both held-out calibration drifts, kept first)."),
        "",
        ("Columns: `-params`, `-MACs`: reduction (MACs at the operating size, batch 1); `x MACs` = MACs "
         "before/after, the speed-up in proportion to MACs; `est`: the planner's estimated latency speed-up "
         "(default kernel table, batch 1); `agree` (%): agreement with the unpruned float model on the "
         "evaluation feeds (cls: top-1; rec: per-step arg-max; det: text/no-text at 0.3 per pixel; NudeNet: "
         "Jaccard index of the above-0.2 (anchor, class) pairs); `fg` (%): NudeNet: cosine of the class "
         "scores alone (x100; `cos` is dominated by the box coordinates, in pixels), "
         "rec: arg-max agreement on the steps where the float model emits a character (not the CTC blank), det: "
         "IoU of the text pixels; `cos`: cosine of the output flattened over all evaluation feeds; `bN`: "
         "measured speed-up at batch N over the unpruned model after the same cleanup and lossless passes "
         "(ONNX Runtime CPU, 1 thread, interleaved; pruning's own share); `bN of x MACs`: that speed-up as a "
         "share of `x MACs`; `ms`: median latency, reference -> pruned; `prune s`: wall time of the pruning "
         "(planning, calibration statistics, reconstruction)."),
        "",
    ]
    for name, e in results.items():
        lines += _model_lines(name, e)
    path.write_text("\n".join(lines) + (reading or "\n## Reading\n\n(to be written)\n"))


def _int_keys(obj):
    """JSON turned batch keys into strings; turn them back."""
    if isinstance(obj, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_int_keys(v) for v in obj]
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratios", default="0.1,0.3,0.5")
    ap.add_argument("--runs-scale", type=float, default=1.0, help="scale the timed rounds (0.2: a quick look)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--stem", default="prune_real", help="results file names, STEM.json and STEM.md "
                    "(prune_real_avx2 for the AVX2 machine's)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite STEM.md from this JSON")
    ap.add_argument("--merge", action="store_true", help="keep the other models' results in STEM.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        write_markdown(_int_keys(json.loads(Path(args.render).read_text())), out / f"{args.stem}.md")
        return 0
    ratios = [float(r) for r in args.ratios.split(",")]
    results = {}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        results[name] = run_model(name, ratios, args.runs_scale)
        results[name]["bench_seconds"] = round(time.perf_counter() - t0)
    old = out / f"{args.stem}.json"
    if args.merge and old.exists():
        kept = _int_keys(json.loads(old.read_text()))
        results = {n: results.get(n, kept.get(n)) for n in MODELS if n in results or n in kept}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(results, indent=1, default=float))
    write_markdown(results, out / f"{args.stem}.md")
    print((out / f"{args.stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
