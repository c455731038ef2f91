"""The pruning options of ``onnxshrink optimize``: ``--prune RATIO [--prune-criterion ...] ...``.

``add_prune_args(parser)`` adds them to the optimize sub-parser (``--calibration`` is shared with the
quantization options); ``run_prune(args)`` runs ``onnxshrink.prune`` and prints the per-layer table.
With ``--quantize int8`` as well, the pruned model is quantized next (prune first, then quantize).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from onnxshrink.cli_check import EXIT_BUDGET_FAILED
from onnxshrink.errors import ConfigError

CRITERIA = ("l1", "l2", "bn", "activation", "reconstruction")


def add_prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured channel pruning (dependency graph; keeps BatchNorm until pruned)")
    g.add_argument("--prune", type=float, metavar="RATIO",
                   help="remove this fraction of the channels of every prunable group (e.g. 0.3)")
    g.add_argument("--prune-criterion", choices=CRITERIA, default="l1",
                   help="channel importance (default l1; activation and reconstruction need --calibration)")
    g.add_argument("--prune-scope", choices=["local", "global"], default="local",
                   help="local: the ratio in every group; global: lowest scores across groups")
    g.add_argument("--prune-target", choices=["channels", "latency", "macs"], default="channels",
                   help="what RATIO is of: channels (default: of every group's channels), latency (of the "
                        "model's latency estimated from kernel throughput by width, widths chosen per group "
                        "to keep the most importance) or macs (of its MACs, the same way)")
    g.add_argument("--kernel-table", default=None, metavar="default|measure|JSON",
                   help="kernel throughput by width for latency estimates: default (built-in curves, with "
                        "this CPU's NCHWc block), measure (time ONNX Runtime's kernels here once at the model's map "
                        "sizes and planning batch, --shape INPUT:0=N, default 1; cached under "
                        "~/.cache/onnxshrink/kernels) or a saved table")
    g.add_argument("--no-uniform-check", action="store_true",
                   help="with --prune-target latency or macs and --calibration: keep the allocated widths "
                        "without also building the uniform plan (the same share of every group) that fits "
                        "the same estimate and keeping whichever drifts less on the calibration data")
    g.add_argument("--prune-measure", action="store_true",
                   help="also time the pruned model against the input (ONNX Runtime CPU, 1 thread, batch 1, "
                        "interleaved) and print the measured latency next to the estimate")
    g.add_argument("--reconstruct", nargs="?", const="lsq", choices=["lsq", "bn"],
                   help="recover without training on --calibration data: lsq (least-squares refit of "
                        "the layers that lost inputs, default) or bn (BatchNorm re-estimation)")
    g.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="keep widths a multiple of N channels (default: the channel block of ONNX Runtime's "
                        "fast conv kernels on this CPU, asked of ONNX Runtime: 16 with AVX-512, else 8; "
                        "0: no rounding)")
    g.add_argument("--min-width", type=int, default=8, metavar="N", help="never keep fewer channels (default 8)")
    g.add_argument("--protect", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="leave groups touching nodes whose name matches (fnmatch) whole")
    g.add_argument("--shape", action="append", default=[], metavar="DIM=SIZE",
                   help="input size for the summary's MACs and pruning's latency estimates, by dim name "
                        "or input:axis (x:2=48); pruning's default: the first --calibration feed's; "
                        "else symbolic dims count as 1")
    g.add_argument("--plan-out", metavar="JSON", help="write the pruning plan (editable) to this file")
    g.add_argument("--plan-in", metavar="JSON", help="apply this pruning plan instead of planning")


def run_prune(args) -> int:
    from onnxshrink import model_io, pruning, report, runtime

    if args.recipe or args.passes or args.preset not in (None, "default", "prune"):
        raise ConfigError("--prune runs its own cleanup, pruning and the lossless passes; "
                          "drop --preset/--passes/--recipe")
    if not args.input:
        raise ConfigError("--prune needs an input model")
    ratio = 0.3 if args.prune is None else args.prune
    quantize_next = bool(getattr(args, "quantize", None))
    if quantize_next:  # prune() writes nothing then, and quantize sees only the pruned temp copy as input
        model_io.check_output(args.output, protected=(args.input,), overwrite_input=args.overwrite_input)
    result = pruning.prune(
        args.input, ratio, None if quantize_next else args.output,
        criterion=args.prune_criterion, calibration=args.calibration, reconstruct=args.reconstruct or False,
        scope=args.prune_scope, target=args.prune_target, kernels=args.kernel_table,
        round_to=args.round_to, min_width=args.min_width, protect=args.protect,
        plan=args.plan_in, plan_out=args.plan_out, check=not args.no_check,
        overwrite_input=args.overwrite_input, dims=runtime.parse_dims(args.shape) or None,
        progress=not args.quiet and sys.stderr.isatty(), uniform_check=not args.no_uniform_check,
    )
    summary = result.plan.summary()
    target = "(quantized next)" if quantize_next else (args.output or "(not written)")
    print(f"onnxshrink optimize --prune {ratio}: {args.input} -> {target}  [{result.seconds:.2f} s, "
          f"criterion {result.plan.settings.get('criterion')}, {summary['channels_removed']} channels removed]")
    print(f"  {result.plan.target_text()}")
    print("  time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in result.phases.items()))
    if args.prune_measure:
        print(f"  {_measured(args.input, result.model)}")
    print(report.before_after_table(result.before, result.after))
    print()
    print(pruning.format_layers(result.layers))
    _print_groups(result.plan)
    if result.reconstruction:
        rec = result.reconstruction
        print(f"reconstruction: {len(rec['refit'])} layers refit, {len(rec['bn'])} BatchNorms re-estimated, "
              f"{rec['passes']} passes over the calibration data")
    drift = None if quantize_next else _drift(args, result)
    if args.report:
        report.write_json(args.report, {**result.to_dict(), "drift": drift})
    if quantize_next:
        return _quantize_pruned(args, result.model)
    if args.max_drift is None or not summary["channels_removed"]:
        return 0
    if drift is None or drift["drift"] is None:
        print(f"FAIL: --max-drift {args.max_drift} asked for, but the drift could not be measured (above)",
              file=sys.stderr)
        return EXIT_BUDGET_FAILED
    if drift["drift"] > args.max_drift:
        print(f"FAIL: pruning drift {drift['drift']:.4g} (1 - cosine) is over --max-drift {args.max_drift}",
              file=sys.stderr)
        return EXIT_BUDGET_FAILED
    return 0


def _drift(args, result) -> dict | None:
    """Outputs of the pruned model against the input's, on --drift-data, else --calibration (what a
    reconstruction was fit on: an optimistic reading), else random feeds; printed and returned."""
    from onnxshrink import validate
    from onnxshrink.errors import ShrinkError

    data = args.drift_data or args.calibration
    dims = result.dims  # --shape, else the first calibration feed's (what MACs were counted at)
    if not result.plan.summary()["channels_removed"]:
        return None
    if data is None:
        from onnxshrink import data as data_mod

        unset = [f"{s.name}:{i}" for s in data_mod.input_specs(result.model)
                 for i, d in enumerate(s.concrete_shape(dims, default=None)) if i > 0 and d is None]
        if unset:
            print(f"  drift against the unpruned model not measured: random feeds need the size of "
                  f"{', '.join(unset)} (give --shape or --calibration)")
            return None
    try:
        written = result.output if result.output is not None else result.model  # by path: not serialized again
        rep = validate.compare(args.input, written, data, dims=dims, count=4, threads=1)
    except ShrinkError as e:
        print(f"  drift against the unpruned model not measured: {e}")
        return None
    cos = rep.overall["cosine"]
    drift = None if cos is None else 1.0 - cos
    where = f"{rep.feeds} {'random feeds' if rep.random_data else 'feeds of ' + rep.data}"
    if drift is None:
        print(f"  drift against the unpruned model not measured on {where}: {'; '.join(rep.failures())}")
        print("  warning: the pruned model's outputs differ from the unpruned's in shape or finiteness (above): "
              "check it before deploying, or prune less")
    else:
        print(f"  output drift against the unpruned model on {where}: 1 - cosine {drift:.4g} (worst output), "
              f"max rel error {rep.overall['max_rel_error']:.3g}")
        if drift > validate.WARN_DRIFT and args.max_drift is None:
            hint = ("" if args.reconstruct and args.prune_criterion == "reconstruction" else
                    "; with calibration data, --prune-criterion reconstruction --reconstruct recovers most of it")
            print(f"  warning: pruning changed the outputs a lot (1 - cosine {drift:.3g} > {validate.WARN_DRIFT}){hint}; "
                  "check accuracy before deploying (--max-drift X makes this an error)")
    return {"drift": drift, "data": rep.data, "random_data": rep.random_data, "feeds": rep.feeds,
            "overall": rep.overall}


def _measured(src, model) -> str:
    """The pruned model's measured latency against the input's (batch 1 from random data, 1 thread)."""
    from onnxshrink import bench

    rep = bench.measure([src, model], dims={}, runs=100, bootstrap=0, labels=["unpruned", "pruned"])
    cpu = rep.providers["cpu"]
    a, b = (m.latency.median_ms for m in cpu.models)
    return (f"measured: latency {b / a:.0%} of unpruned ({1000 * a:,.0f} -> {1000 * b:,.0f} us, speed-up "
            f"{cpu.ratio.speedup:.2f}x; ONNX Runtime CPU, 1 thread, feed {rep.feed}, 100 interleaved runs)")


def _print_groups(plan) -> None:
    for g in plan.groups:
        if g.status == "blocked":
            print(f"  group {g.id} ({', '.join(g.producers) or 'no weights'}) not pruned: {g.stops[0]}")
        elif g.status in ("protected", "too narrow"):
            print(f"  group {g.id} ({', '.join(g.producers)}) not pruned: {g.status}")
        elif g.status == "unchanged" and g.stops:
            print(f"  group {g.id} ({', '.join(g.producers)}) not pruned: {g.stops[0]}")


def _quantize_pruned(args, model) -> int:
    from onnxshrink import model_io
    from onnxshrink.cli_quantize import run_quantize

    with tempfile.TemporaryDirectory(prefix="onnxshrink-pruned-") as tmp:
        path = model_io.save(model, Path(tmp) / "pruned.onnx")
        sys.stdout.flush()
        return run_quantize(argparse.Namespace(**{**vars(args), "input": str(path)}))
