"""The ``onnxshrink`` command line. Maps typed errors to exit codes (2 usage/input, 3 internal)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from onnxshrink import __version__, cli_check

logger = logging.getLogger(__name__)


def bundled_model() -> Path:
    """The small model shipped inside the package (used when ``optimize`` is given no input)."""
    return Path(__file__).parent / "bundled" / "demo.onnx"


def _progress_printer(enabled: bool):
    if not enabled:
        return None
    tty = sys.stderr.isatty()

    def show(name: str) -> None:
        if tty:
            sys.stderr.write(f"\r\033[Krunning {name} ...")
            sys.stderr.flush()

    return show


# ---------------------------------------------------------------- optimize


def add_optimize(sub) -> None:
    p = sub.add_parser(
        "optimize",
        help="rewrite a model with a preset, a pass list or a recipe",
        description="Optimize an ONNX model. Without IN, optimizes the bundled demo model.",
    )
    p.add_argument("input", nargs="?", help="input .onnx (default: the bundled demo model)")
    p.add_argument("-o", "--output", help="output .onnx (default: print the summary only)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", help="named pass list (default: 'default', lossless)")
    group.add_argument("--recipe", help="TOML recipe file with [[step]] tables")
    group.add_argument("--passes", help="comma-separated pass names, run once each in order")
    p.add_argument("--check-each", action="store_true",
                   help="compare ONNX Runtime outputs after every changing pass; name the pass that breaks them")
    p.add_argument("--no-check", action="store_true", help="skip the structural check after each pass")
    p.add_argument("--overwrite-input", action="store_true", help="allow -o to name the input file")
    p.add_argument("--opset", type=int, metavar="N",
                   help="convert the model to default-domain opset N first (up only), so fusions into newer "
                        "ops fire: Gelu (20), LayerNormalization (17), HardSwish (14)")
    p.add_argument("--report", help="write the summary as JSON to this file")
    p.add_argument("--list-passes", action="store_true", help="list registered passes and presets, then exit")
    from onnxshrink.cli_quantize import add_quantize_args

    add_quantize_args(p)
    from onnxshrink.cli_prune import add_prune_args

    add_prune_args(p)
    p.set_defaults(func=run_optimize, option_defaults={d: p.get_default(d) for ds in ONLY_WITH.values() for d in ds})


#: Options that only mean something with a mode: set without it they would be ignored, so they are
#: refused (``--reconstruct`` alone optimized losslessly and said nothing).
ONLY_WITH = {
    "--prune RATIO or --plan-in": ("prune_criterion", "prune_scope", "prune_target", "kernel_table",
                                   "prune_measure", "reconstruct", "round_to", "min_width", "protect",
                                   "plan_out", "no_uniform_check"),
    "--quantize": ("calib_method", "per_tensor", "activations", "reduce_range", "pair_safe", "exclude", "exclude_op",
                   "keep_first", "keep_last", "no_tune", "conv_transpose", "equalize", "smoothquant",
                   "bias_correction", "max_metric_drop", "metric"),
    "--quantize or --prune": ("calibration", "max_drift", "drift_data"),
}


def _refuse_unused(args, pruning: bool, quantizing: bool) -> None:
    from onnxshrink.errors import ConfigError

    active = {"--prune RATIO or --plan-in": pruning, "--quantize": quantizing,
              "--quantize or --prune": pruning or quantizing}
    problems = []
    for mode, dests in ONLY_WITH.items():
        given = [d for d in dests if getattr(args, d) != args.option_defaults[d]]
        if given and not active[mode]:
            opts = ", ".join("--" + d.replace("_", "-") for d in given)
            problems.append(f"{opts} {'applies' if len(given) == 1 else 'apply'} only with {mode}")
    if problems:
        raise ConfigError("; ".join(problems) + " (without them the model is only optimized losslessly)")


def run_optimize(args) -> int:
    from onnxshrink import api, pipeline, report, runtime
    from onnxshrink.passes import REGISTRY

    if args.list_passes:
        for name, cls in sorted(REGISTRY.items()):
            print(f"{name:24s} {(cls.__doc__ or '').strip().splitlines()[0]}")
        print("presets: " + ", ".join(sorted(pipeline.PRESETS)))
        return 0
    pruning = args.prune is not None or bool(args.plan_in) or args.preset == "prune"
    quantizing = bool(args.quantize) or args.preset == "int8"
    _refuse_unused(args, pruning, quantizing)
    if pruning:  # the preset: --prune 0.3, L1
        from onnxshrink.cli_prune import run_prune

        return run_prune(args)
    if quantizing:
        from onnxshrink.cli_quantize import run_quantize

        return run_quantize(args)
    src = args.input or str(bundled_model())
    passes = args.passes.split(",") if args.passes else None
    result = api.optimize(
        src,
        args.output,
        preset=args.preset,
        passes=passes,
        recipe=args.recipe,
        check=not args.no_check,
        check_each=args.check_each,
        overwrite_input=args.overwrite_input,
        progress=_progress_printer(not args.quiet),
        dims=runtime.parse_dims(args.shape),
        opset=args.opset,
    )
    if sys.stderr.isatty() and not args.quiet:
        sys.stderr.write("\r\033[K")
    print(f"onnxshrink optimize: {src} -> {args.output or '(not written)'}  [{result.seconds:.2f} s]")
    if result.opset_upgraded_from is not None:
        print(f"opset {result.opset_upgraded_from} -> {args.opset} (onnx.version_converter)")
    print(report.before_after_table(result.before, result.after))
    print()
    print(report.pass_table(result.report.per_pass()))
    for problem in result.input_problems:
        print(f"note: input model: {problem}")
    if args.report:
        report.write_json(args.report, result.to_dict())
    return 0


# ---------------------------------------------------------------- inspect


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's interface, ops, parameters, MACs and size")
    p.add_argument("model", help="input .onnx")
    p.add_argument("--json", dest="json_out", help="also write the summary as JSON to this file")
    p.add_argument("--shape", action="append", default=[], metavar="DIM=SIZE",
                   help="value of a symbolic dim for the MACs estimate, by name (batch=1) or "
                   "input:axis (x:2=48); unknown dims count as 1")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from onnxshrink import model_io, ort_int8, report, runtime, stats

    model = model_io.load(args.model)
    summary = stats.summarize(model, args.model, dims=runtime.parse_dims(args.shape))
    sig = stats.io_signature(model)
    info = {
        "ir_version": model.ir_version,
        "opset_imports": dict(model.opset_imports),
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        **sig,
        **summary,
        "external_data_files": stats.external_files(model),
        "int8_clipped_layers": ort_int8.clipped_layers(model),
    }
    print(f"{args.model}")
    print(f"  IR version {info['ir_version']}, opsets "
          + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in info["opset_imports"].items()))
    if info["producer"]:
        print(f"  producer: {info['producer']}")
    for kind in ("inputs", "outputs"):
        print(f"  {kind}:")
        for v in info[kind]:
            print(f"    {v['name']}: {v['dtype']} {v['shape']}")
    print(f"  nodes {summary['nodes']:,}, parameters {summary['parameters']:,}, "
          f"{report.macs_label(summary['macs_dims_as_1'])} {summary['macs']:,}, weights {report.human_bytes(summary['initializer_bytes'])}, "
          f"file {report.human_bytes(summary['file_bytes'])}")
    if info["external_data_files"]:
        print("  external data: " + ", ".join(info["external_data_files"]))
    rows = sorted(summary["ops"].items(), key=lambda kv: (-kv[1], kv[0]))
    print(report.format_table(["op", "count"], rows))
    note = ort_int8.clipped_note(info["int8_clipped_layers"])
    if note:
        print(note)
    if args.json_out:
        report.write_json(args.json_out, info)
    return 0


# ---------------------------------------------------------------- main

#: The explicit command table: name -> function adding its sub-parser.
COMMANDS = {
    "optimize": add_optimize,
    "inspect": add_inspect,
    "validate": cli_check.add_validate,
    "bench": cli_check.add_bench,
    "explain": cli_check.add_explain,
    "check": cli_check.add_check,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxshrink",
        description="ONNX graph optimizer: lossless cleanup, int8 quantization, channel pruning, "
        "validation and a pre-deploy gate.",
    )
    parser.add_argument("--version", action="version", version=f"onnxshrink {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


#: Options that name a file the command writes besides its model: checked before any work.
REPORT_PATHS = ("report", "json_out", "junit", "markdown", "plan_out")


def _check_report_paths(args) -> None:
    from onnxshrink import model_io

    protected = [getattr(args, k, None) for k in ("input", "model", "model2", "reference", "candidate")]
    for key in REPORT_PATHS:
        path = getattr(args, key, None)
        if isinstance(path, str) and path:
            model_io.check_output(path, protected=[p for p in protected if isinstance(p, str)])


def main(argv: list[str] | None = None) -> int:
    from onnxshrink.errors import ShrinkError

    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _check_report_paths(args)
        return int(args.func(args) or 0)
    except ShrinkError as e:
        print(f"onnxshrink: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxshrink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
