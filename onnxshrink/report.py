"""Readable tables and JSON reports."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path


def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    """A plain-text table; numbers right-aligned, text left-aligned."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    numeric = [all(_is_num(r[i]) for r in rows if i < len(r)) and rows for i in range(len(headers))]

    def line(values):
        parts = []
        for i, v in enumerate(values):
            parts.append(v.rjust(widths[i]) if numeric[i] and i else v.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(list(headers)))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.1f}"
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def before_after_table(before: dict, after: dict) -> str:
    """Totals and per-op node counts, before and after, with the change."""
    rows = []
    for key, label in (
        ("nodes", "nodes"),
        ("parameters", "parameters"),
        ("initializer_bytes", "weight bytes"),
        ("file_bytes", "file bytes"),
        ("macs", macs_label(before.get("macs_dims_as_1") or after.get("macs_dims_as_1"))),
    ):
        if key in before or key in after:
            b, a = before.get(key), after.get(key)
            rows.append([label, b, a, _delta(b, a)])
    ops = sorted(set(before.get("ops", {})) | set(after.get("ops", {})))
    for op in ops:
        b, a = before["ops"].get(op, 0), after["ops"].get(op, 0)
        rows.append([f"  {op}", b, a, _delta(b, a)])
    return format_table(["", "before", "after", "change"], rows)


def macs_label(dims_as_1: list[str] | None) -> str:
    """``MACs``, naming the symbolic input dims the count took as 1 (a model with a dynamic height and
    width otherwise shows a count thousands of times too small with nothing to say so)."""
    if not dims_as_1:
        return "MACs"
    names = ", ".join(dims_as_1)
    return f"MACs ({names} as 1)" if len(names) <= 24 else f"MACs ({len(dims_as_1)} symbolic dims as 1)"


def _delta(b, a) -> str:
    if b is None or a is None:
        return "-"
    if b == a:
        return "="
    if b == 0:
        return f"+{a:,}"
    return f"{(a - b) / b:+.1%}"


def pass_table(per_pass: dict[str, dict]) -> str:
    rows = []
    for name, row in per_pass.items():
        counts = ", ".join(f"{k}={v}" for k, v in sorted(row["counts"].items())) or "-"
        if row.get("left"):
            counts += "; left: " + ", ".join(f"{k}={v}" for k, v in sorted(row["left"].items()))
        rows.append([name, row["runs"], row["seconds"] * 1000, len(row["skipped"]), counts])
    return format_table(["pass", "runs", "ms", "skipped", "changes"], rows)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
