"""Does ``prune``'s uniform check keep the better plan? Judged on evaluation data it never saw.

A latency target with calibration data builds two plans that fit the same estimated latency: the
widths the allocator chose per group and the uniform plan (the smallest share of every group's
channels that fits), refits both on all calibration feeds but a held-out quarter, and keeps the one
that drifts less there (the uniform one only if 20% lower; ``onnxshrink.pruning._choose``). This
script asks whether that choice is right on data neither the refit nor the check saw:

- per model and latency ratio, ``prune(target="latency", criterion="reconstruction",
  reconstruct="lsq")`` with the check: which plan it kept, and both held-out drifts;
- then both plans built the way a user would get them (``uniform_check=False`` for the allocated
  widths, ``target="channels"`` at the uniform ratio), each refit on every calibration feed, and
  scored on the evaluation data: digits classifiers (``bench_prune``'s models; calibration: 512
  ``calib`` samples; evaluation: the 360-sample ``test`` split) by accuracy and output drift; real
  models (``bench_prune_real``'s, its calibration and evaluation feeds) by its agreement measure and
  output drift;
- ``right``: the kept plan's evaluation drift is the lower of the two, or within 20% of it (what the
  check's margin can tell apart).

Digits ratios: 0.3 and 0.5 of the estimated latency and ``=ch`` (the channels plan's estimate at that
ratio, as ``bench_prune``'s ``latency=ch``); real models: 0.1, 0.3, 0.5. A budget out of reach, or a
uniform plan with the allocated widths, has no check and is listed as such.

    /work/venv/bin/python benchmarks/bench_prune_check.py [--models cnn,ppocr_det] [--out benchmarks/results]
        [--stem prune_check]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_prune
import bench_prune_real

from models import digits, fetch_real
from onnxshrink import pruning, runtime
from onnxshrink.errors import ConfigError
from onnxshrink.validate import flat_drift, flat_floats

DIGITS = ("resnet", "mobilenet", "inception", "cnn", "vit", "resnet_wide", "mobilenet_wide")
REAL = tuple(bench_prune_real.MODELS)
OPTS = {"criterion": "reconstruction", "reconstruct": "lsq"}
MARGIN = 0.2


class Case:
    """One model: its path, calibration feeds, dims and an evaluation scorer."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name in REAL:
            spec = bench_prune_real.MODELS[name]
            self.path, self.dims = str(fetch_real.fetch(name)), spec.dims
            self.calib = fetch_real.example_feeds(name, n=spec.calib, seed=0)
            self.evals = fetch_real.example_feeds(name, n=spec.evals, seed=1)
            self.ratios = [(r, r) for r in (0.1, 0.3, 0.5)]
        else:
            self.path, self.dims = str(digits.trained_path(name)), None
            self.calib = digits.feeds(name, "calib", batch=64)
            x, self.labels = digits.model_input(name, "test")
            self.evals = [{"input": x}]
            self.ratios = [(r, r) for r in (0.3, 0.5)] + [(f"{r}=ch", self._channels_budget(r)) for r in (0.3, 0.5)]
        self.ref = self.outputs(self.path)

    def _channels_budget(self, ratio: float) -> float:
        est = pruning.prune(self.path, ratio, None).plan.settings["estimate"]["latency_us"]
        return 1.0 - est[1] / est[0]

    def outputs(self, model) -> list[np.ndarray]:
        sess = runtime.make_session(model, threads=1)
        return [sess.run(None, f)[0] for f in self.evals]

    def score(self, model) -> dict:
        got = self.outputs(model)
        drift = flat_drift(flat_floats(self.ref), flat_floats(got))
        if self.name in REAL:
            q = bench_prune_real.quality(self.name, self.ref, got)
            return {"drift": drift, "agree": q["agree"]}
        return {"drift": drift, "agree": digits.accuracy(got[0], self.labels)}

    def prune(self, ratio: float, **kw):
        return pruning.prune(self.path, ratio, None, calibration=self.calib, dims=self.dims, **OPTS, **kw)


def run_case(case: Case, label, ratio: float) -> dict:
    row: dict = {"model": case.name, "ratio": label, "budget": round(1 - ratio, 4)}
    t0 = time.perf_counter()
    try:
        res = case.prune(ratio, target="latency")
    except ConfigError as e:
        return {**row, "error": str(e).split(":")[0]}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    check = res.plan.settings.get("check")
    if not check:
        return {**row, "error": "no check: the uniform plan has the allocated widths"}
    t0 = time.perf_counter()
    alloc = case.prune(ratio, target="latency", uniform_check=False)
    row["seconds_unchecked"] = round(time.perf_counter() - t0, 1)
    tried = {t["plan"]: t for t in check["tried"]}
    uni = case.prune(tried["uniform"]["uniform_ratio"])
    row.update({"kept": check["kept"], "held_out": check["feeds"] if check.get("held_out") else 0,
                "uniform_ratio": tried["uniform"]["uniform_ratio"],
                "check_drift": {k: t["drift"] for k, t in tried.items()},
                "eval": {"allocated": case.score(alloc.model), "uniform": case.score(uni.model)},
                "macs": {"allocated": alloc.after["macs"], "uniform": uni.after["macs"], "unpruned": alloc.before["macs"]}})
    ev = row["eval"]
    other = "allocated" if check["kept"] == "uniform" else "uniform"
    row["right"] = ev[check["kept"]]["drift"] <= (1 + MARGIN) * ev[other]["drift"]
    return row


def write_markdown(rows: list[dict], machine: dict, path: Path) -> None:
    reading = bench_prune_real._hand_written(path)
    checked = [r for r in rows if "error" not in r]
    lines = [
        "# The uniform check of budgeted pruning plans, judged on evaluation data",
        "",
        (f"`python benchmarks/bench_prune_check.py` (see its docstring). {machine['cpu']}, NCHWc block "
         f"{machine['nchwc_block']}. Latency target, `reconstruction` criterion, least-squares refit."),
        "",
        ("`check drift`: 1 - cosine on the held-out calibration feeds (`held`), allocated / uniform, both refit "
         "on the other feeds; `kept`: the plan `prune` kept; `eval drift` and `eval agree`: both plans refit on "
         "every calibration feed, on the evaluation data (digits: test accuracy %; real models: "
         "`bench_prune_real`'s agreement %), allocated / uniform; `-MACs`: allocated / uniform; `right`: the "
         "kept plan's evaluation drift is the lower, or within 20% of it; `s`: seconds of `prune` with the "
         "check / without."),
        "",
        (f"Right on {sum(r['right'] for r in checked)} of {len(checked)} checked rows; the uniform plan kept on "
         f"{sum(r['kept'] == 'uniform' for r in checked)}."),
        "",
        "| model | ratio | budget | uniform r | held | check drift | kept | eval drift | eval agree | -MACs | right | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['ratio']} | {r['budget']:.0%} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | | | |")
            continue
        cd, ev, m = r["check_drift"], r["eval"], r["macs"]
        lines.append(
            f"{head} {r['uniform_ratio']:g} | {r['held_out']} | {cd['allocated']:.3g} / {cd['uniform']:.3g} | "
            f"{r['kept']} | {ev['allocated']['drift']:.3g} / {ev['uniform']['drift']:.3g} | "
            f"{100 * ev['allocated']['agree']:.1f} / {100 * ev['uniform']['agree']:.1f} | "
            f"{1 - m['allocated'] / m['unpruned']:.0%} / {1 - m['uniform'] / m['unpruned']:.0%} | "
            f"{'yes' if r['right'] else '**no**'} | {r['seconds']} / {r['seconds_unchecked']} |")
    path.write_text("\n".join(lines) + "\n" + (reading or "\n## Reading\n\n(to be written)\n"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DIGITS + REAL))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--stem", default="prune_check")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        case = Case(name)
        for label, ratio in case.ratios:
            row = run_case(case, label, ratio)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = bench_prune.machine()
    (out / f"{args.stem}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1, default=float))
    write_markdown(rows, machine, out / f"{args.stem}.md")
    print((out / f"{args.stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
