"""Markdown pieces of a report: numbers, cells, tables, and links to raw files that work on GitHub."""

from __future__ import annotations

import os
from pathlib import Path

from hybrid_vlm.provenance import portable_path
from vlmeval_plugin.results import number_text

# a report's name: its folder under --out, and in a sweep the record sweep_<name>.json
REPORT_NAME = r"[A-Za-z0-9._-]+"

def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    """A number as tables show it ("–" when missing), with `suffix` (e.g. "×") after it."""
    text = number_text(None if value is None else float(value), spec)
    return text if text == "–" else text + suffix


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Linker:
    """Markdown links to raw files, relative to the report's folder (they work on GitHub)."""

    def __init__(self, report_dir: Path):
        self.report_dir = report_dir.resolve()

    def rel(self, path: Path | str) -> str:
        return Path(os.path.relpath(Path(path).resolve(), self.report_dir)).as_posix()

    def link(self, text: str, path: Path | str | None) -> str:
        """A link to a file in the checkout; outside it (a work dir elsewhere, not snapshotted) the
        text alone, since a relative link would spell out the machine's folders and lead nowhere
        from a commit."""
        if not path:
            return "–"
        try:
            inside = Path(path).resolve().is_relative_to(Path.cwd().resolve())
        except (OSError, ValueError):
            inside = False
        return f"[{text}]({self.rel(path)})" if inside else text


def display_path(path: Path | str) -> str:
    """A path as the user would type it: relative to the current directory when below it, else as
    committed provenance may hold it (`portable_path`: under `~`, or its name alone), never a
    machine's absolute path."""
    path = Path(path)
    try:
        if path.resolve().is_relative_to(Path.cwd()):
            return Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix()
    except (OSError, ValueError):
        pass
    return portable_path(path)


