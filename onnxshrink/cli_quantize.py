"""The int8 options of ``onnxshrink optimize``: ``--quantize int8 --calibration DATA ...``.

``add_quantize_args(parser)`` adds the options to the optimize sub-parser; ``run_quantize(args)`` runs
``onnxshrink.quantize`` and prints the summary. ``--quantize int8`` lets the tuner pick static, dynamic
or float per region for transformer-like models; ``static`` and ``dynamic`` force a mode. Accuracy
recovery: ``--equalize``, ``--smoothquant [ALPHA]``, ``--bias-correction``, ``--max-drift X`` /
``--max-metric-drop X --metric NAME`` (``--drift-data`` for a held-out set). ``recovery_hooks(args)``
is the extension point for more: it turns options into hooks that ``quantize`` calls after the build
(see ``onnxshrink.quantize.QuantizeContext``).
"""

from __future__ import annotations

import argparse
import sys

from onnxshrink.errors import ConfigError, RuntimeFailure

#: The observers ``calibrate`` takes (``onnxshrink.observers.make_observer``); kept here so that building
#: the parser imports nothing heavy. A test checks it against ``onnxshrink.quantize.CALIB_METHODS``.
CALIB_METHODS = ("auto", "minmax", "ema", "percentile", "entropy", "mse")


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("int8 quantization (runs the lossless passes first)")
    g.add_argument("--quantize", choices=["int8", "static", "dynamic"],
                   help="int8: static QDQ, and for transformer-like models the fastest of static/dynamic/float "
                        "per region on this CPU; static: QDQ only; dynamic: int8 MatMul/Gemm weights, "
                        "activations quantized at run time (no --calibration needed)")
    g.add_argument("--calibration", metavar="DATA",
                   help="calibration feeds: a folder of .npz files (one feed each) or one stacked .npz")
    g.add_argument("--calib-method", choices=CALIB_METHODS, default="auto",
                   help="range observer (default auto: min/max or percentile ranges, with or without bias "
                        "correction, whichever drifts least on calibration feeds)")
    g.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    g.add_argument("--activations", choices=["auto", "uint8", "int8"], default="auto",
                   help="activation type (default auto: the faster for this CPU, uint8 on x86)")
    g.add_argument("--reduce-range", nargs="?", choices=["auto", "all", "off"], const="all", default="auto",
                   help="7-bit weights: for every layer (all; the flag alone), none (off), or auto (default): "
                        "for the ops whose int8 kernels saturate 8-bit weights on this CPU (Conv/MatMul/Gemm "
                        "with AVX2 and no VNNI); quantizing for another CPU than this one, give all")
    g.add_argument("--pair-safe", action=argparse.BooleanOptionalAction, default=None,
                   help="narrowed static weights pair-safe (up to 8 bits, never clipped) instead of 7-bit "
                        "(default: --calib-method auto with --reduce-range auto decides by drift)")
    g.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="keep nodes whose name matches float (fnmatch, or re:REGEX)")
    g.add_argument("--exclude-op", nargs="+", action="extend", default=[], metavar="OP",
                   help="keep every node of these op types float (LSTM: keeps LSTMs standard ONNX instead of "
                        "ONNX Runtime's contrib DynamicQuantizeLSTM)")
    g.add_argument("--keep-first", type=int, default=0, metavar="N",
                   help="keep the first N quantizable compute layers float")
    g.add_argument("--keep-last", type=int, default=0, metavar="N",
                   help="keep the last N quantizable compute layers float")
    g.add_argument("--no-tune", action="store_true",
                   help="quantize every quantizable node instead of timing a few placements and "
                        "keeping the fastest on this CPU")
    g.add_argument("--conv-transpose", choices=["weights", "qdq", "float"], default="weights",
                   help="ConvTranspose: int8 weights only (default; the CPU EP does not fuse it), "
                        "full QDQ, or float")


    r = p.add_argument_group("accuracy recovery (each optional; see onnxshrink.recovery)")
    r.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization of Conv/Gemm pairs before calibration (exact in float)")
    r.add_argument("--smoothquant", type=float, nargs="?", const=0.5, default=None, metavar="ALPHA",
                   help="SmoothQuant: move activation outliers into MatMul/Gemm weights (alpha, default 0.5)")
    r.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="subtract each quantized layer's mean output shift (measured on the calibration data; "
                        "default: --calib-method auto decides, other methods do not)")
    r.add_argument("--max-drift", type=float, metavar="X",
                   help="keep the most sensitive nodes float until 1 - cosine <= X on the drift data; with "
                        "--prune alone: exit 1 when the pruned model's drift is over X")
    r.add_argument("--max-metric-drop", type=float, metavar="X",
                   help="keep nodes float until the task metric drops by at most X (needs --metric)")
    r.add_argument("--metric", help="task metric for --max-metric-drop: accuracy, module:function or file.py:function")
    r.add_argument("--drift-data", metavar="DATA", help="held-out feeds for --max-drift (default: --calibration)")


def _narrowed(result, plan: dict) -> str:
    """Which quantized ops got 7-bit or pair-safe weights (all, or those of ``reduce_range_ops`` the model has;
    ``plan``: ``result.plan.summary()``), and whether the dynamic layers got pair-safe ones."""
    opts = result.options
    pair_safe = ", pair-safe weights for the dynamic layers" if result.dynamic_nodes and (
        opts.reduce_range or "MatMulInteger" in opts.reduce_range_ops) else ""
    kind = "pair-safe" if opts.pair_safe else "7-bit"
    if opts.reduce_range:
        return (f", {kind} weights" if plan["quantized_ops"] else "") + pair_safe
    narrowed = [op for op in opts.reduce_range_ops if op in plan["quantized_ops"]]
    seven = f", {kind} weights for {'/'.join(narrowed)}" if narrowed else ""
    return f"{seven}{pair_safe} (their 8-bit kernels saturate here)" if seven or pair_safe else ""


def recovery_hooks(args) -> list:
    """Accuracy-recovery hooks from the command line (none yet: ``--max-drift`` plugs in here)."""
    return []


def run_quantize(args) -> int:
    from onnxshrink import quantize, report, runtime

    if args.recipe or args.passes or (args.preset not in (None, "int8")):
        raise ConfigError("--quantize int8 runs the lossless preset then QDQ; drop --preset/--passes/--recipe")
    mode = {"int8": "auto", None: "auto"}.get(args.quantize, args.quantize)
    if not args.calibration and (mode != "dynamic" or args.max_drift is not None or args.smoothquant is not None
                                 or args.max_metric_drop is not None or args.bias_correction):
        raise ConfigError("--quantize int8 needs --calibration DATA (a folder of .npz feeds or a stacked .npz)")
    if not args.input:
        raise ConfigError("--quantize int8 needs an input model")
    result = quantize.quantize(
        args.input, args.calibration, args.output, mode=mode,
        equalize=args.equalize, smoothquant=args.smoothquant, bias_correction=args.bias_correction,
        max_drift=args.max_drift, max_metric_drop=args.max_metric_drop, metric=args.metric,
        drift_data=args.drift_data,
        method=args.calib_method, activations=args.activations, per_channel=not args.per_tensor,
        reduce_range={"all": True, "off": False}.get(args.reduce_range, "auto"), pair_safe=args.pair_safe,
        exclude=args.exclude,
        exclude_ops=args.exclude_op,
        keep_first=args.keep_first, keep_last=args.keep_last, conv_transpose=args.conv_transpose,
        tune=not args.no_tune,
        check=not args.no_check, overwrite_input=args.overwrite_input, recovery=recovery_hooks(args),
        progress=not args.quiet and sys.stderr.isatty(), dims=runtime.parse_dims(args.shape),
    )
    plan = result.plan.summary()
    print(f"onnxshrink optimize --quantize {args.quantize or 'int8'}: {args.input} -> "
          f"{args.output or '(not written)'}  [{result.seconds:.2f} s, {result.method}, "
          f"{result.options.activations} activations{_narrowed(result, plan)}]")
    for line in result.warnings:
        print(f"WARNING: {line}")
    print("time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in result.phases.items()))
    if result.tuning is not None:
        t = result.tuning
        print(f"tuned on this CPU (float {t.float_ms:.3f} ms, chosen {t.speedup}x float): kept {t.chosen}")
        for row in t.tried:
            knobs = {k: v for k, v in row.items() if k not in ("median_ms", "vs_best_ms", "kept", "drift",
                                                                 "vs_best_drift", "float_ms")}
            print(f"  {'kept ' if row['kept'] else 'tried'} {row['median_ms']:.3f} ms, "
                  f"drift {row['drift']:.3g} {knobs}")
    print(f"placement: linear layers {result.placement.linear}, the rest {result.placement.rest}"
          + (f"; {len(result.dynamic_nodes)} linear layers dynamic" if result.dynamic_nodes else "")
          + (f"; {result.speedup}x float speed on this CPU (1 thread)" if result.speedup else ""))
    _print_recovery(result.recovery)
    measured = result.recovery.get("drift", {})
    if measured.get("drift") is not None:
        print(f"drift against float: 1 - cosine {measured['drift']:.3g} (worst output, {measured['feeds']} "
              "calibration feeds)")
    elif measured.get("why"):
        print(f"drift against float: not measured ({measured['why']})")
    if result.upcast_float16:
        print(f"note: float16 model: quantized from a float32 copy ({result.upcast_float16} float16 values made "
              "float32); its inputs and outputs stay float16")
    if result.opset_upgraded_from:
        print(f"note: upgraded from opset {result.opset_upgraded_from} to 13 for per-channel QDQ")
    print(report.before_after_table(result.before, result.after))
    print()
    dynamic = {"dynamic linear layers": len(result.dynamic_nodes)} if result.dynamic_nodes else {}
    print(f"quantized {result.quantized_nodes} nodes: "
          + ", ".join(f"{op} {n}" for op, n in {**plan["quantized_ops"], **dynamic}.items())
          + f"; {plan['relus_folded']} Relu/Clip folded; {plan['kept_float']} kept float")
    for line in result.skipped[:20]:
        print(f"  float: {line}")
    if len(result.skipped) > 20:
        print(f"  ... and {len(result.skipped) - 20} more (see --report)")
    for line in result.warnings:
        print(f"WARNING: {line}")
    out = result.to_dict()
    if result.output is not None:
        try:
            fusion = quantize.fusion_report(result.output)
        except RuntimeFailure as e:  # a custom op ONNX Runtime has no kernel for here: written, not checked
            print(f"ONNX Runtime CPU fusion: not checked ({e})")
        else:
            print(f"ONNX Runtime CPU fusion: {'every QDQ node unit fused' if fusion else str(fusion)}")
            out["fusion"] = fusion.to_dict()
    if args.report:
        report.write_json(args.report, out)
    return 0


def _print_recovery(rec: dict) -> None:
    for name in ("cross_layer_equalization", "smoothquant"):
        if name in rec:
            print(f"{name}: {rec[name]['counts'] or 'nothing changed'}")
            for line in rec[name]["skipped"][:5]:
                print(f"  {line}")
    if "bias_correction" in rec:
        bc = rec["bias_correction"]
        worst = max(bc["max_abs_shift"].values(), default=0.0)
        print(f"bias correction: {bc['layers_corrected']} layers, largest shift removed {worst:.3g}; "
              f"{len(bc['skipped'])} skipped")
    mp = rec.get("mixed_precision")
    if mp:
        first, final = mp["initial"], mp["final"]
        budget = {k: v for k, v in mp["budget"].items() if v is not None}
        drop = ""
        if final["metric_drop"] is not None:
            drop = f", metric drop {first['metric_drop']:.4g} -> {final['metric_drop']:.4g}"
        print(f"drift budget {budget}: {'met' if mp['met'] else 'NOT met'}; drift {first['drift']:.3g} -> "
              f"{final['drift']:.3g}{drop} with {len(mp['kept_float'])} nodes kept float "
              f"({len(mp['evaluations'])} builds, {mp['seconds']} s)")
        for row in mp["kept_float"]:
            sqnr = f", SQNR {row['input_sqnr_db']} -> {row['sqnr_db']} dB" if "sqnr_db" in row else ""
            print(f"  float: {row['op_type']} {row['node']!r}: adds noise {row['added_noise']}{sqnr}")
