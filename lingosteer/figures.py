"""Figures: matplotlib without a display, each saved as a PNG whole or not at all."""

from __future__ import annotations

from pathlib import Path

from lingosteer.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120, **savefig_kwargs) -> Path:
    """Write `fig` to `path` as PNG through `atomic_path` (a reader never sees half a picture), then close it."""
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", **savefig_kwargs)
    finally:
        pyplot().close(fig)
    return Path(path)
