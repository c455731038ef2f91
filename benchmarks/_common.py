"""Helpers the benchmark scripts share."""

from __future__ import annotations

from pathlib import Path


def kept_reading(path: Path) -> str:
    """The hand-written ``## Reading`` section of the results file at ``path`` (kept across reruns), from
    its newline on; empty when the file or the section is missing."""
    if path.exists() and "\n## Reading" in (text := path.read_text()):
        return text[text.index("\n## Reading"):]
    return ""
