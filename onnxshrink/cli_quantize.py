"""The int8 options of ``onnxshrink optimize``: ``--quantize int8 --calibration DATA ...``.

``add_quantize_args(parser)`` adds the options to the optimize sub-parser; ``run_quantize(args)`` runs
``onnxshrink.quantize`` and prints the summary. ``recovery_hooks(args)`` is the extension point for
accuracy recovery (``--max-drift`` and friends): it turns their options into hooks that
``quantize`` calls after the QDQ pass (see ``onnxshrink.quantize.QuantizeContext``).
"""

from __future__ import annotations

import argparse
import sys

from onnxshrink.errors import ConfigError

#: The observers ``calibrate`` takes (``onnxshrink.observers.make_observer``); kept here so that building
#: the parser imports nothing heavy. A test checks it against ``onnxshrink.quantize.CALIB_METHODS``.
CALIB_METHODS = ("minmax", "ema", "percentile", "entropy", "mse")


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("int8 quantization (runs the lossless passes first)")
    g.add_argument("--quantize", choices=["int8"], help="static int8 QDQ quantization (needs --calibration)")
    g.add_argument("--calibration", metavar="DATA",
                   help="calibration feeds: a folder of .npz files (one feed each) or one stacked .npz")
    g.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax",
                   help="range observer (default: minmax)")
    g.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    g.add_argument("--activations", choices=["auto", "uint8", "int8"], default="auto",
                   help="activation type (default auto: the faster for this CPU, uint8 on x86)")
    g.add_argument("--reduce-range", action="store_true",
                   help="7-bit weights, for CPUs whose u8s8 kernels saturate (AVX2 without VNNI)")
    g.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="keep nodes whose name matches float (fnmatch, or re:REGEX)")
    g.add_argument("--exclude-op", nargs="+", action="extend", default=[], metavar="OP",
                   help="keep every node of these op types float")
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


def recovery_hooks(args) -> list:
    """Accuracy-recovery hooks from the command line (none yet: ``--max-drift`` plugs in here)."""
    return []


def run_quantize(args) -> int:
    from onnxshrink import quantize, report

    if args.recipe or args.passes or (args.preset not in (None, "int8")):
        raise ConfigError("--quantize int8 runs the lossless preset then QDQ; drop --preset/--passes/--recipe")
    if not args.calibration:
        raise ConfigError("--quantize int8 needs --calibration DATA (a folder of .npz feeds or a stacked .npz)")
    if not args.input:
        raise ConfigError("--quantize int8 needs an input model")
    result = quantize.quantize(
        args.input, args.calibration, args.output,
        method=args.calib_method, activations=args.activations, per_channel=not args.per_tensor,
        reduce_range=args.reduce_range, exclude=args.exclude, exclude_ops=args.exclude_op,
        keep_first=args.keep_first, keep_last=args.keep_last, conv_transpose=args.conv_transpose,
        tune=not args.no_tune,
        check=not args.no_check, overwrite_input=args.overwrite_input, recovery=recovery_hooks(args),
        progress=not args.quiet and sys.stderr.isatty(),
    )
    plan = result.plan.summary()
    print(f"onnxshrink optimize --quantize int8: {args.input} -> {args.output or '(not written)'}  "
          f"[{result.seconds:.2f} s, {result.method}, {result.options.activations} activations]")
    if result.tuning is not None:
        t = result.tuning
        print(f"tuned on this CPU (float {t.float_ms:.3f} ms): kept {t.chosen}")
        for row in t.tried:
            knobs = {k: v for k, v in row.items() if k not in ("median_ms", "vs_best_ms", "kept")}
            print(f"  {'kept ' if row['kept'] else 'tried'} {row['median_ms']:.3f} ms {knobs}")
    if result.opset_upgraded_from:
        print(f"note: upgraded from opset {result.opset_upgraded_from} to 13 for per-channel QDQ")
    print(report.before_after_table(result.before, result.after))
    print()
    print(f"quantized {plan['quantized_nodes']} nodes "
          + ", ".join(f"{op} {n}" for op, n in plan["quantized_ops"].items())
          + f"; {plan['relus_folded']} Relu/Clip folded; {plan['kept_float']} kept float")
    for line in result.skipped[:20]:
        print(f"  float: {line}")
    if len(result.skipped) > 20:
        print(f"  ... and {len(result.skipped) - 20} more (see --report)")
    out = result.to_dict()
    if result.output is not None:
        fusion = quantize.fusion_report(result.output)
        print(f"ONNX Runtime CPU fusion: {'every QDQ node unit fused' if fusion else str(fusion)}")
        out["fusion"] = fusion.to_dict()
    if args.report:
        report.write_json(args.report, out)
    return 0
