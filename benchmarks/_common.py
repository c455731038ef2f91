"""Helpers the benchmark scripts share."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def kept_reading(path: Path) -> str:
    """The hand-written ``## Reading`` section of the results file at ``path`` (kept across reruns), from
    its newline on; empty when the file or the section is missing."""
    if path.exists() and "\n## Reading" in (text := path.read_text()):
        return text[text.index("\n## Reading"):]
    return ""


def write_results(res: dict, out: str | os.PathLike, stem: str, write_markdown: Callable[[dict, Path], None]) -> None:
    """Close ``res["load"]`` with the load average now, write ``stem.json`` and ``stem.md`` (by
    ``write_markdown``) in ``out`` and print the markdown."""
    res["load"].append(round(os.getloadavg()[0], 2))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out / f"{stem}.md")
    print((out / f"{stem}.md").read_text())
