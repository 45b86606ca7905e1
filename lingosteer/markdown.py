"""Markdown tables, as every report of the project writes them."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list], right_aligned: bool = False) -> str:
    """A GitHub markdown table; cells are written with `str`. `right_aligned` right-aligns every
    column (for tables of numbers)."""
    rule = "---:|" if right_aligned else "---|"
    lines = ["| " + " | ".join(header) + " |", "|" + rule * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
