"""Sub-commands ``validate``, ``bench``, ``explain`` and ``check`` (registered in ``cli.COMMANDS``).

They only chain the library: ``validate.compare`` measures drift, ``bench.measure`` latency,
``explain.explain`` ranks nodes, ``gate.decide`` judges the budgets. Progress goes to stderr, results
to stdout, JSON/JUnit/Markdown to the files asked for.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from onnxshrink.errors import ConfigError, DataError, RuntimeFailure

EXIT_BUDGET_FAILED = 1


def _add_data_args(p, *, count: bool = True) -> None:
    p.add_argument("--data", help="a folder of .npz feeds, or one .npz with a leading sample axis "
                                  "(default: random feeds, which say little about accuracy)")
    p.add_argument("--shape", action="append", metavar="DIM=SIZE",
                   help="size of a symbolic dim, e.g. N=8 or input:0=8 (repeatable)")
    if count:
        p.add_argument("--count", type=int, default=None, help="number of random feeds (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random feeds")
    p.add_argument("--providers", help="execution providers: cpu, cuda, tensorrt (comma-separated)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (validate/explain: ONNX Runtime's default; bench/check timing: 1)")


def _refuse_count_with_data(count, data) -> None:
    """``--count`` sizes random feeds only; with ``--data`` it was ignored without a word."""
    if count is not None and data:
        raise ConfigError("--count sets how many random feeds are made; with --data every feed in it is used")


def _dims(args) -> dict:
    from onnxshrink import runtime

    return runtime.parse_dims(args.shape)


def _progress(args, label: str):
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None

    def show(done, total):
        sys.stderr.write(f"\r\033[K{label}: {done}/{total if total else '?'}")
        sys.stderr.flush()

    return show


def _clear_progress(args) -> None:
    if not getattr(args, "quiet", False) and sys.stderr.isatty():
        sys.stderr.write("\r\033[K")


# ---------------------------------------------------------------- validate


def add_validate(sub) -> None:
    p = sub.add_parser("validate", help="measure a candidate's numerical drift against its reference",
                       description="Run REF and CAND on the same feeds and report per-output drift. "
                                   "Exit 0 when the candidate's outputs are finite and match in shape, 1 if not.")
    p.add_argument("reference", help="reference .onnx")
    p.add_argument("candidate", help="candidate .onnx")
    _add_data_args(p)
    _add_metric_args(p)
    p.add_argument("--json", dest="json_out", help="write the drift report as JSON to this file")
    p.set_defaults(func=run_validate)


def _add_metric_args(p) -> None:
    p.add_argument("--metric", help="task metric: 'accuracy', module:function or file.py:function, called "
                                    "per feed as metric(outputs_by_name, labels) -> score or (score, weight)")
    p.add_argument("--labels", default="labels",
                   help="name of the labels array stored with each feed (not a model input; default: labels)")


def run_validate(args) -> int:
    from onnxshrink import report, validate

    _refuse_count_with_data(args.count, args.data)
    drift = validate.compare(
        args.reference, args.candidate, args.data, providers=args.providers, threads=args.threads,
        dims=_dims(args), count=args.count or 8, seed=args.seed, metric=args.metric,
        labels_key=args.labels, progress=_progress(args, "validate: feed"),
    )
    _clear_progress(args)
    _print_drift(drift)
    clipped = _clipped_note(args.candidate, drift.providers)
    if args.json_out:
        report.write_json(args.json_out, {**drift.to_dict(), "int8_clipped_layers": clipped})
    return 0 if drift else EXIT_BUDGET_FAILED


def _clipped_note(candidate, providers) -> list[str]:
    """Layers of an int8 candidate whose 8-bit weights ONNX Runtime's kernels saturate on this CPU
    (``ort_int8.clipped_layers``), printed as a note: drift that shows here and not on VNNI CPUs."""
    from onnxshrink import model_io, ort_int8, runtime

    layers = ort_int8.clipped_layers(model_io.load(candidate), runtime.resolve_providers(providers)[:1])
    note = ort_int8.clipped_note(layers)
    if note:
        print(note)
    return layers


def _print_drift(drift) -> None:
    from onnxshrink import report

    print(f"drift over {drift.feeds} feeds ({drift.data}; providers {', '.join(drift.providers)})")
    if drift.random_data:
        print("note: random data says little about accuracy; pass --data")
    if drift.outputs:
        print(report.format_table(list(drift.TABLE_HEADERS), drift.table_rows()))
    if drift.metric:
        m = drift.metric
        print(f"metric {m.name}: reference {m.reference:.6g}, candidate {m.candidate:.6g}, "
              f"difference {m.difference:+.6g}")
    for line in drift.failures():
        print(f"FAIL: {line}")


# ---------------------------------------------------------------- bench


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency of a model, or of two models interleaved with their ratio",
                       description="Time MODEL (and MODEL2, interleaved A B B A ..., with the speed-up of "
                                   "MODEL2 over MODEL and its spread) on each execution provider.")
    p.add_argument("model", help="the .onnx to time (the reference when MODEL2 is given)")
    p.add_argument("model2", nargs="?", help="a second .onnx (the candidate) timed against the first")
    _add_data_args(p, count=False)
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per model first (default 10)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per model (default 100)")
    p.add_argument("--json", dest="json_out", help="write the latency report as JSON to this file")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from onnxshrink import bench, report

    models = [args.model] + ([args.model2] if args.model2 else [])
    result = bench.measure(
        models, args.data, providers=args.providers or "cpu",
        threads=1 if args.threads is None else args.threads, warmup=args.warmup, runs=args.runs,
        dims=_dims(args), seed=args.seed, progress=_bench_progress(args),
    )
    _clear_progress(args)
    _print_bench(result)
    if args.json_out:
        report.write_json(args.json_out, result.to_dict())
    return 0 if result.measured() else 2


def _bench_progress(args):
    """Rounds done on a terminal; one line per finished provider in logs (CI)."""
    if getattr(args, "quiet", False):
        return None
    show = _progress(args, "bench")
    if show is not None:
        return lambda provider, done, total: show(f"{provider} round {done}", total)

    def log(provider, done, total):
        if done == total:
            print(f"bench: {provider}: {total} interleaved rounds done", file=sys.stderr)

    return log


def _print_bench(result) -> None:
    from onnxshrink import report

    print(f"latency: {result.warmup} warm-up + {result.runs} timed runs per model, feed "
          + ", ".join(f"{k} {v}" for k, v in result.feed.items()))
    print(report.format_table(list(result.TABLE_HEADERS), result.table_rows()))
    for short, p in result.providers.items():
        if p.skipped:
            print(f"{short}: skipped: {p.skipped}")
            continue
        t = p.threads
        print(f"{short}: intra-op threads {t['intra_op_num_threads']}, inter-op {t['inter_op_num_threads']}"
              + (", I/O binding with inputs and outputs on the GPU" if p.io_binding else ""))
        if t.get("note"):
            print(f"  note: {t['note']}")
        kinds = {m.memory_kind for m in p.models}
        print(f"  memory: {', '.join(sorted(kinds))}")
        if p.ratio:
            r = p.ratio
            print(f"  speed-up of {p.models[1].label} over {p.models[0].label}: {r.speedup:.3f}x "
                  f"(95% interval {r.ci_low:.3f}-{r.ci_high:.3f}; per-round ratio p10 {r.pair_p10:.3f}, "
                  f"p50 {r.pair_p50:.3f}, p90 {r.pair_p90:.3f}; {r.pairs} interleaved rounds)")


# ---------------------------------------------------------------- explain


def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="rank the candidate's nodes by the error they add",
                       description="Map CAND's tensors to REF's (by name; quantized tensors through their "
                                   "Q/DQ pair), measure each tensor's SQNR on a few feeds and print the "
                                   "nodes that lose the most, one line each.")
    p.add_argument("reference", help="reference .onnx")
    p.add_argument("candidate", help="candidate .onnx")
    _add_data_args(p, count=False)
    p.add_argument("--batches", type=int, default=4, help="feeds to run (default 4)")
    p.add_argument("--top", type=int, default=10, help="offenders to print (default 10)")
    p.add_argument("--json", dest="json_out", help="write every node and tensor as JSON to this file")
    p.set_defaults(func=run_explain)


def run_explain(args) -> int:
    from onnxshrink import explain, report

    result = explain.explain(args.reference, args.candidate, args.data, providers=args.providers,
                             threads=args.threads, batches=args.batches, dims=_dims(args), seed=args.seed)
    print(f"top {min(args.top, len(result.nodes))} of {len(result.nodes)} nodes by the noise they add "
          f"({result.batches} feeds, {len(result.tensors)} tensors compared, {len(result.unmatched)} unmatched)")
    top = result.top(args.top)
    width = max((len(n.node) for n in top), default=4)
    op_width = max((len(n.op_type) for n in top), default=2)
    for node in top:
        print(node.line(width, op_width))
    if args.json_out:
        report.write_json(args.json_out, result.to_dict())
    return 0


# ---------------------------------------------------------------- check


def add_check(sub) -> None:
    from onnxshrink import gate

    p = sub.add_parser(
        "check", help="the pre-deploy gate: exit 0 when every budget holds, 1 when one fails, 2 on bad input",
        description="Measure CAND against REF (drift; latency when a speed budget is set; size) and judge "
                    "the budgets from --config, [tool.onnxshrink.gate] in pyproject.toml or [gate] in "
                    "onnxshrink.toml (searched upward from here), and the command line.")
    p.add_argument("reference", help="reference .onnx")
    p.add_argument("candidate", help="candidate .onnx")
    _add_data_args(p)
    _add_metric_args(p)
    p.add_argument("--config", help="TOML file with the budgets (pyproject.toml or onnxshrink.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a budget or setting, e.g. min_cosine=0.999 or max_latency_ms.cpu=5")
    for key, (_, what) in gate.BUDGETS.items():
        p.add_argument("--" + key.replace("_", "-"), type=float, metavar="X",
                       help=what.replace("%", "%%") + (" (all providers)" if key in gate.PER_PROVIDER else ""))
    p.add_argument("--bench", action="store_true", help="time the models even without a speed budget")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per model (default 10)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per model (default 100)")
    p.add_argument("--json", dest="json_out", help="write budgets, measurements and verdicts as JSON")
    p.add_argument("--junit", help="write JUnit XML, one test case per budget")
    p.add_argument("--markdown", help="write the Markdown summary to this file "
                                      "(it is always appended to $GITHUB_STEP_SUMMARY when that is set)")
    p.set_defaults(func=run_check)


def _gate_config(args):
    from onnxshrink import gate

    config = gate.load_config(args.config)
    pairs = list(args.overrides)
    for key in gate.BUDGETS:
        value = getattr(args, key, None)
        if value is not None:
            pairs.append(f"{key}={value}")
    return gate.apply_overrides(config, pairs)


def _setting(args, config, name: str, default):
    value = getattr(args, name, None)
    if value is not None:
        return value
    return config.settings.get(name, default)


def run_check(args) -> int:
    from onnxshrink import gate, report

    config = _gate_config(args)
    try:
        measurements = _measure_for_gate(args, config)
    except RuntimeFailure as e:  # the gate treats a model ONNX Runtime cannot run as bad input
        raise DataError(str(e)) from e
    result = gate.decide(config.budgets, measurements)
    rows = [[c.name, c.limit, c.value, "pass" if c.passed else "FAIL", c.message] for c in result.checks]
    print(f"onnxshrink check: {args.candidate} against {args.reference}"
          + (f" (budgets from {config.source})" if config.source else ""))
    print(report.format_table(["check", "limit", "measured", "result", "detail"], rows))
    print(f"{'PASSED' if result else 'FAILED'}: {len(result.checks) - len(result.failures)} of "
          f"{len(result.checks)} checks hold")
    measurements["int8_clipped_layers"] = _clipped_note(args.candidate, measurements["drift"]["providers"])
    _write_gate_outputs(args, config, result, measurements)
    return 0 if result else EXIT_BUDGET_FAILED


def _measure_for_gate(args, config) -> dict:
    from onnxshrink import bench, gate, model_io, runtime, validate

    dims = runtime.parse_dims(args.shape or _as_list(config.settings.get("shape")))
    data = _setting(args, config, "data", None)
    _refuse_count_with_data(args.count, data)
    if "max_metric_drop" in config.budgets and not _setting(args, config, "metric", None):
        raise ConfigError("max_metric_drop needs a task metric: pass --metric (e.g. accuracy) or set "
                          "metric in the gate config; without one it can only fail as 'not measured'")
    providers = _check_providers(args, config)
    drift = validate.compare(
        args.reference, args.candidate, data, providers=providers[:1],
        threads=_setting(args, config, "threads", None), dims=dims,
        count=_setting(args, config, "count", 8), seed=args.seed,
        metric=_setting(args, config, "metric", None), labels_key=args.labels,
        progress=_progress(args, "check: feed"),
    )
    _clear_progress(args)
    measurements = {"drift": drift.to_dict()}
    if args.bench or any(k in config.budgets for k in gate.PER_PROVIDER):
        timed = bench.measure(
            [args.reference, args.candidate], data, providers=providers,
            threads=_setting(args, config, "threads", 1), warmup=_setting(args, config, "warmup", 10),
            runs=_setting(args, config, "runs", 100), dims=dims, seed=args.seed, extras=(args.labels,),
            progress=_bench_progress(args),
        )
        _clear_progress(args)
        measurements["bench"] = timed.to_dict()
    measurements["size"] = {
        "reference_bytes": model_io.file_size(args.reference),
        "candidate_bytes": model_io.file_size(args.candidate),
    }
    return measurements


def _check_providers(args, config) -> list[str]:
    """--providers, else the config's, else the providers named in per-provider budgets, else cpu."""
    from onnxshrink import gate

    given = args.providers or config.settings.get("providers")
    if given:
        return [p.strip() for p in given.split(",") if p.strip()]
    named = []
    for key in gate.PER_PROVIDER:
        limit = config.budgets.get(key)
        if isinstance(limit, dict):
            named.extend(p for p in limit if p not in named)
    return named or ["cpu"]


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _write_gate_outputs(args, config, result, measurements) -> None:
    from onnxshrink import report

    if args.json_out:
        report.write_json(args.json_out, {
            "reference": args.reference, "candidate": args.candidate, "config": config.source,
            "budgets": config.budgets, "settings": config.settings, **result.to_dict(),
            "measurements": measurements,
        })
    if args.junit:
        Path(args.junit).write_text(result.to_junit())
    markdown = result.to_markdown(f"onnxshrink check `{Path(args.candidate).name}`")
    if args.markdown:
        Path(args.markdown).write_text(markdown)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as f:
            f.write(markdown + "\n")
