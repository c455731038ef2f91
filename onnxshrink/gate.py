"""The pre-deploy gate: budgets from a config file, and a pure decision over measurements.

Budgets live in ``pyproject.toml`` under ``[tool.onnxshrink.gate]`` or in ``onnxshrink.toml`` under
``[gate]``; ``find_config()`` searches the current folder and its parents (an ``onnxshrink.toml`` wins
over a ``pyproject.toml`` in the same folder). Unknown keys are an error. Command-line overrides
(``key=value``, ``max_latency_ms.cpu=5``) go through ``apply_overrides``.

``decide(budgets, measurements)`` is pure (no ONNX Runtime, no files): it takes plain dicts, as
``DriftReport.to_dict()`` and ``BenchReport.to_dict()`` give them, and returns a ``GateResult`` whose
``bool()`` says whether every budget holds. A budget that could not be measured fails. When drift was
measured, two checks always run: no NaN/Inf in the candidate where the reference is finite, and the
reference's own NaN/Inf unchanged (``finite_outputs``), and the same
outputs and shapes as the reference (``outputs_match``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from xml.etree import ElementTree as ET

from onnxshrink.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Budget keys: (direction, description). ``min_*`` hold when measured >= limit, ``max_*`` when <=.
BUDGETS: dict[str, tuple[str, str]] = {
    "min_cosine": ("min", "cosine similarity, lowest over outputs"),
    "min_worst_feed_cosine": ("min", "cosine similarity of the worst single feed"),
    "max_abs_error": ("max", "max absolute error, over outputs"),
    "max_mean_abs_error": ("max", "mean absolute error, highest over outputs"),
    "max_rel_error": ("max", "max relative error, over outputs"),
    "min_sqnr_db": ("min", "SQNR in dB, lowest over outputs"),
    "min_top1_agreement": ("min", "top-1 agreement of classifier outputs"),
    "min_top5_agreement": ("min", "top-5 agreement of classifier outputs"),
    "max_metric_drop": ("max", "task metric of the reference minus the candidate's"),
    "min_speedup": ("min", "speed-up over the reference (lower end of its 95% interval), per provider"),
    "max_latency_ms": ("max", "candidate median latency in ms, per provider"),
    "max_size_mb": ("max", "candidate file size in MB (10^6 bytes), external data included"),
}
#: The values a budget can take (lowest, highest, whether the lowest is allowed): a limit outside them
#: can never hold (or always holds) and is a typo, refused before any work.
RANGES: dict[str, tuple[float, float, bool]] = {
    "min_cosine": (-1.0, 1.0, True), "min_worst_feed_cosine": (-1.0, 1.0, True),
    "min_top1_agreement": (0.0, 1.0, True), "min_top5_agreement": (0.0, 1.0, True),
    "max_abs_error": (0.0, math.inf, True), "max_mean_abs_error": (0.0, math.inf, True),
    "max_rel_error": (0.0, math.inf, True), "min_speedup": (0.0, math.inf, True),
    "max_latency_ms": (0.0, math.inf, False), "max_size_mb": (0.0, math.inf, False),
}
#: Budgets that may be given per provider, as a table ``{cpu = 5.0, cuda = 1.0}``.
PER_PROVIDER = {"min_speedup", "max_latency_ms"}
#: Non-budget settings the config may hold (the command line wins).
SETTINGS: dict[str, type] = {
    "data": str, "providers": str, "metric": str, "shape": str,
    "runs": int, "warmup": int, "threads": int, "count": int,
}
PROVIDERS = {
    "cpu": "cpu", "cpuexecutionprovider": "cpu",
    "cuda": "cuda", "cudaexecutionprovider": "cuda",
    "tensorrt": "tensorrt", "trt": "tensorrt", "tensorrtexecutionprovider": "tensorrt",
}
_DRIFT_KEYS = {
    "min_cosine": "cosine", "min_worst_feed_cosine": "worst_feed_cosine", "max_abs_error": "max_abs_error",
    "max_mean_abs_error": "mean_abs_error", "max_rel_error": "max_rel_error", "min_sqnr_db": "sqnr_db",
    "min_top1_agreement": "top1_agreement", "min_top5_agreement": "top5_agreement",
}


@dataclasses.dataclass
class GateConfig:
    budgets: dict
    settings: dict
    source: str | None = None


def find_config(start: str | Path | None = None) -> Path | None:
    """The nearest ``onnxshrink.toml`` with ``[gate]`` or ``pyproject.toml`` with ``[tool.onnxshrink.gate]``."""
    folder = Path(start or Path.cwd()).resolve()
    for d in (folder, *folder.parents):
        for name in ("onnxshrink.toml", "pyproject.toml"):
            f = d / name
            if f.is_file() and _gate_table(_read_toml(f), f) is not None:
                return f
    return None


def load_config(path: str | Path | None = None, *, start: str | Path | None = None) -> GateConfig:
    """Read budgets and settings from ``path`` (or the file ``find_config`` finds; none: empty)."""
    if path is None:
        path = find_config(start)
        if path is None:
            return GateConfig({}, {}, None)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    table = _gate_table(_read_toml(path), path)
    if table is None:
        where = "[tool.onnxshrink.gate]" if path.name == "pyproject.toml" else "[gate]"
        raise ConfigError(f"{path}: no {where} table")
    budgets, settings = split_config(table, str(path))
    return GateConfig(budgets, settings, str(path))


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read this TOML file: {e}") from e


def _gate_table(doc: dict, path: Path):
    if path.name == "pyproject.toml":
        return doc.get("tool", {}).get("onnxshrink", {}).get("gate")
    return doc.get("gate")


def split_config(table: Mapping, where: str = "config") -> tuple[dict, dict]:
    """Check every key and split them into (budgets, settings). Unknown keys raise ``ConfigError``."""
    budgets, settings = {}, {}
    for key, value in table.items():
        if key in BUDGETS:
            budgets[key] = _budget_value(key, value, where)
        elif key in SETTINGS:
            settings[key] = _setting_value(key, value, where)
        else:
            raise ConfigError(
                f"{where}: unknown gate key {key!r}; budgets are {sorted(BUDGETS)}, settings {sorted(SETTINGS)}"
            )
    return budgets, settings


def _budget_value(key: str, value, where: str):
    if isinstance(value, Mapping):
        if key not in PER_PROVIDER:
            raise ConfigError(f"{where}: {key} takes one number, not a table")
        out = {}
        for prov, v in value.items():
            short = PROVIDERS.get(str(prov).lower())
            if short is None:
                raise ConfigError(f"{where}: {key}.{prov}: unknown provider; use one of cpu, cuda, tensorrt")
            out[short] = _number(f"{key}.{prov}", v, where)
        return out
    return _number(key, value, where)


def _number(key: str, value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    lo, hi, lo_ok = RANGES.get(key.split(".")[0], (-math.inf, math.inf, True))
    if not (lo <= value <= hi) or (value == lo and not lo_ok):
        span = f"{'[' if lo_ok else '('}{lo:g}, {hi:g}]"
        raise ConfigError(f"{where}: {key} = {value!r} is outside {span}; no measurement can meet it")
    return float(value)


def _setting_value(key: str, value, where: str):
    kind = SETTINGS[key]
    if kind is str and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return value


def apply_overrides(config: GateConfig, pairs: list[str]) -> GateConfig:
    """Apply ``key=value`` overrides (``max_latency_ms.cpu=5`` sets one provider) to a copy of ``config``."""
    budgets = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.budgets.items()}
    settings = dict(config.settings)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ConfigError(f"--set {pair!r}: write KEY=VALUE, for example min_cosine=0.999")
        base, dot, prov = key.partition(".")
        if base in SETTINGS and not dot:
            settings[base] = raw if SETTINGS[base] is str else _parse_int(key, raw)
            continue
        value = _parse_float(key, raw)
        if dot:
            entry = _budget_value(base, {prov: value}, "--set") if base in BUDGETS else None
            if entry is None:
                raise ConfigError(f"--set {key}: unknown gate key {base!r}; budgets are {sorted(BUDGETS)}")
            current = budgets.get(base)
            merged = dict(current) if isinstance(current, dict) else {}
            merged.update(entry)
            budgets[base] = merged
        else:
            budgets.update(split_config({key: value}, "--set")[0])
    return GateConfig(budgets, settings, config.source)


def _parse_float(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: the value must be a number") from None


def _parse_int(key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: the value must be an integer") from None


@dataclasses.dataclass
class Check:
    """One budget (or built-in check) and its verdict."""

    name: str
    limit: float | str | None
    value: float | str | None
    passed: bool
    message: str


@dataclasses.dataclass
class GateResult:
    checks: list[Check]

    def __bool__(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"passed": bool(self), "failures": len(self.failures),
                "checks": [_json_safe(dataclasses.asdict(c)) for c in self.checks]}

    def to_junit(self, suite: str = "onnxshrink.gate") -> str:
        """JUnit XML: one test case per check, failures with their messages."""
        root = ET.Element("testsuites", name="onnxshrink check", tests=str(len(self.checks)),
                          failures=str(len(self.failures)), errors="0")
        ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(self.checks)),
                           failures=str(len(self.failures)), errors="0", skipped="0")
        for c in self.checks:
            case = ET.SubElement(ts, "testcase", classname=suite, name=c.name, time="0")
            if not c.passed:
                fail = ET.SubElement(case, "failure", message=c.message, type="BudgetExceeded")
                fail.text = f"{c.name}: measured {_fmt(c.value)}, limit {_fmt(c.limit)}\n{c.message}"
            else:
                ET.SubElement(case, "system-out").text = c.message
        return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"

    def to_markdown(self, title: str = "onnxshrink check") -> str:
        """A Markdown summary (for ``$GITHUB_STEP_SUMMARY``)."""
        verdict = "passed" if self else f"FAILED ({len(self.failures)} of {len(self.checks)} checks)"
        lines = [f"### {title}: {verdict}", "", "| check | limit | measured | result | detail |",
                 "| --- | ---: | ---: | :---: | --- |"]
        for c in self.checks:
            mark = "pass" if c.passed else "**FAIL**"
            detail = c.message.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{c.name}` | {_fmt(c.limit)} | {_fmt(c.value)} | {mark} | {detail} |")
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.6g}"
    return str(v)


def _json_safe(d: dict) -> dict:
    return {k: (_fmt(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _num(v) -> float | None:
    """Numbers from measurement dicts ('inf' strings included); None when absent."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return float(v)


def decide(budgets: Mapping, measurements: Mapping) -> GateResult:
    """Check every budget against ``measurements`` (pure; plain dicts in, a ``GateResult`` out).

    ``measurements`` may hold ``drift`` (``DriftReport.to_dict()``), ``bench`` (``BenchReport.to_dict()``
    with a reference and a candidate) and ``size`` (``{"reference_bytes": n, "candidate_bytes": n}``).
    """
    budgets, _ = split_config(budgets, "gate budgets")
    drift = measurements.get("drift")
    checks = _builtin_checks(drift) if drift is not None else []
    for key in BUDGETS:
        if key not in budgets:
            continue
        limit = budgets[key]
        if key in _DRIFT_KEYS:
            checks.append(_drift_check(key, limit, drift))
        elif key == "max_metric_drop":
            metric = (drift or {}).get("metric")
            value = _num(metric.get("drop")) if metric else None
            checks.append(_verdict(key, limit, value, "no task metric was measured (give --metric and labels)"))
        elif key in PER_PROVIDER:
            checks.extend(_provider_checks(key, limit, measurements.get("bench")))
        elif key == "max_size_mb":
            size = measurements.get("size") or {}
            value = _num(size.get("candidate_bytes"))
            checks.append(_verdict(key, limit, None if value is None else value / 1e6,
                                   "the candidate's file size is unknown"))
    return GateResult(checks)


def _builtin_checks(drift: Mapping) -> list[Check]:
    outputs = drift.get("outputs") or {}
    bad = {n: o.get("nonfinite", 0) + o.get("nonfinite_mismatch", 0) for n, o in outputs.items()
           if o.get("nonfinite") or o.get("nonfinite_mismatch")}
    ref_bad = sum(o.get("reference_nonfinite", 0) for o in outputs.values())
    ok_text = ("no NaN/Inf in the candidate's outputs" if not ref_bad else
               f"no NaN/Inf in the candidate where the reference is finite; the reference's {ref_bad} NaN/Inf "
               "values are the same in the candidate")
    finite = Check("finite_outputs", 0.0, float(sum(bad.values())), not bad,
                   ok_text if not bad else "NaN/Inf in the candidate (or values differing where the reference is "
                   "NaN/Inf): " + ", ".join(f"{n!r} ({k} values)" for n, k in bad.items()))
    problems = list(drift.get("problems") or [])
    if not outputs and not problems:
        problems.append("no output was compared")
    match = Check("outputs_match", None, None, not problems,
                  "same outputs and shapes as the reference" if not problems else "; ".join(problems[:5]))
    return [finite, match]


def _drift_check(key: str, limit: float, drift: Mapping | None) -> Check:
    stat = _DRIFT_KEYS[key]
    if drift is None:
        return _verdict(key, limit, None, "drift was not measured")
    value = _num((drift.get("overall") or {}).get(stat))
    worst = _worst_output(drift, stat, BUDGETS[key][0])
    why = ("no classifier-like output (2-D [N, C] float)" if "top" in stat
           else "no output had finite values to compare")
    check = _verdict(key, limit, value, why)
    if worst and value is not None:
        check.message += f" (worst output {worst!r})"
    return check


def _worst_output(drift: Mapping, stat: str, direction: str) -> str | None:
    vals = [(n, _num(o.get(stat))) for n, o in (drift.get("outputs") or {}).items()]
    vals = [(n, v) for n, v in vals if v is not None]
    if len(vals) < 2:
        return None
    return (min if direction == "min" else max)(vals, key=lambda nv: nv[1])[0]


def _provider_checks(key: str, limit, bench: Mapping | None) -> list[Check]:
    provs = (bench or {}).get("providers") or {}
    targets = limit if isinstance(limit, dict) else {p: limit for p in provs}
    if not targets:
        return [_verdict(key, limit, None, "latency was not measured (no provider was benchmarked)")]
    checks = []
    for prov, lim in targets.items():
        name = f"{key}.{prov}"
        entry = provs.get(prov)
        if entry is None:
            checks.append(_verdict(key, lim, None, f"{prov} was not benchmarked", name))
            continue
        if entry.get("skipped"):
            checks.append(_verdict(key, lim, None, f"{prov} was skipped: {entry['skipped']}", name))
            continue
        if key == "min_speedup":
            ratio = entry.get("ratio")
            value = _num(ratio.get("ci_low")) if ratio else None
            check = _verdict(key, lim, value, "no reference was timed beside the candidate", name)
            if ratio:
                check.message += (f"; speed-up {_num(ratio['speedup']):.3f}, 95% interval "
                                  f"{_num(ratio['ci_low']):.3f}-{_num(ratio['ci_high']):.3f} "
                                  f"over {ratio.get('pairs')} interleaved rounds")
        else:
            models = entry.get("models") or []
            value = _num(models[-1]["latency"]["median_ms"]) if models else None
            check = _verdict(key, lim, value, "the candidate was not timed", name)
        checks.append(check)
    return checks


def _verdict(key: str, limit: float, value: float | None, why_missing: str, name: str | None = None) -> Check:
    direction, what = BUDGETS[key]
    name = name or key
    if value is None:
        return Check(name, limit, None, False, f"not measured: {why_missing}")
    passed = value >= limit if direction == "min" else value <= limit
    op = (">=" if passed else "<") if direction == "min" else ("<=" if passed else ">")
    message = f"{_fmt(value)} {op} {_fmt(limit)}"
    return Check(name, limit, value, passed, message if passed else f"{message}: {what}")
