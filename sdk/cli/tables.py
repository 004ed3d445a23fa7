"""Plain-text tables and time formatting shared by the CLI's commands (no third-party imports)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = ["ago", "human_size", "print_table", "table_lines"]


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned columns, a dashed rule under the headers, no trailing spaces."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    for line in table_lines(headers, rows):
        print(line)


def human_size(size: float) -> str:
    """Bytes in binary units: ``512 B``, ``3.4 KiB``, ``87.0 MiB``, ``1.2 GiB``."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024.0
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def ago(ts: Any, now: float | None = None) -> str:
    """Unix seconds as "12s ago", "5m ago", "3h ago", "2d ago"; "-" for nothing."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "-"
    delta = max(0.0, (time.time() if now is None else now) - float(ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{int(delta // size)}{unit} ago"
    return f"{int(delta)}s ago"
