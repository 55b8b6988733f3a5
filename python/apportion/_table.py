"""The one plain-text and Markdown table renderer behind every ``str()`` report.

A leaf module: reports in any layer format their cells and hand them here, so column
alignment and the rule under the header look the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["markdown", "text"]


def _cell(c: str) -> str:
    """``c`` on one line: a character that is not printable (a newline, a tab, a NUL, as a
    model's name may hold) is written as its escape (``\\n``), so no cell breaks a row."""
    if c.isprintable():
        return c
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in c)


def text(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> list[str]:
    """Aligned columns separated by two spaces, a dashed rule under the header. The first
    ``left`` columns are left-aligned (names), the rest right-aligned (numbers)."""
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"table row {list(r)!r} has {len(r)} cells, the header {len(header)}")
    table = [[_cell(c) for c in header], *([_cell(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for n, r in enumerate(table):
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table (``|`` inside a cell is escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |"

    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"table row {list(r)!r} has {len(r)} cells, the header {len(header)}")
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]
