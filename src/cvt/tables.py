"""Markdown tables: what the `cvt` command prints and the ablation studies write."""
from __future__ import annotations

__all__ = ["format_table"]


def format_table(rows: list[tuple[str, ...]]) -> str:
    """A markdown table (first row the header): readable in a terminal and pasteable into docs."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:])])
