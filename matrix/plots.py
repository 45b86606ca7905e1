"""Pictures of an interference matrix (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lingosteer.figures import pyplot, save_figure


def heatmap(matrix: np.ndarray, labels: list[str], title: str, path: Path, cmap: str, center: float | None = None,
            colorbar_label: str = "", row_axis: str = "evaluated language",
            column_axis: str = "added language", completed: np.ndarray | None = None) -> Path:
    """`completed` (bool, like `matrix`): cells predicted rather than measured, marked with a dot."""
    plt = pyplot()
    size = max(5.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    if center is not None:
        reach = np.nanmax(np.abs(matrix - center)) or 1.0
        image = ax.imshow(matrix, cmap=cmap, vmin=center - reach, vmax=center + reach)
    else:
        image = ax.imshow(matrix, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(column_axis)
    ax.set_ylabel(row_axis)
    ax.set_title(title, fontsize=10)
    if len(labels) <= 16:
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                text = f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6)
    if completed is not None and completed.any():
        rows, cols = np.nonzero(completed)
        ax.scatter(cols, rows, s=6, c="black", marker="o", linewidths=0)
    fig.colorbar(image, ax=ax, shrink=0.8, label=colorbar_label)
    return save_figure(fig, path, bbox_inches="tight")


def robustness_friendliness_scatter(robustness: np.ndarray, friendliness: np.ndarray, labels: list[str],
                                    groups: list[str], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        ax.scatter(friendliness[members], robustness[members], label=group or "unknown", s=40)
    for i, label in enumerate(labels):
        ax.annotate(label, (friendliness[i], robustness[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("friendliness (column mean: effect of this language on others)")
    ax.set_ylabel("robustness (row mean: effect of others on this language)")
    ax.set_title("Robustness vs friendliness (higher = less interference)", fontsize=10)
    ax.legend(title="script", fontsize=7)
    return save_figure(fig, path, bbox_inches="tight")


def group_heatmaps(blocks: dict[str, tuple[list[str], np.ndarray]], path: Path) -> Path:
    """One panel per grouping (family, script, resource): mean I by (evaluated group, added group)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4.8))
    reach = max((np.nanmax(np.abs(b)) for _, b in blocks.values() if np.isfinite(b).any()), default=1.0)
    for ax, (name, (groups, block)) in zip(np.atleast_1d(axes), blocks.items()):
        image = ax.imshow(block, cmap="RdBu", vmin=-reach, vmax=reach)
        ax.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(groups)), groups, fontsize=8)
        for (i, j), value in np.ndenumerate(block):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"mean interference by {name}\n(row = evaluated, column = added)", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8)
    return save_figure(fig, path, bbox_inches="tight")


def downstream_plot(summary: dict, path: Path) -> Path:
    """Left: each target's accuracy (95% CI) untrained, mono, with low- and high-interference partners.
    Right: I[A,B] against the accuracy drop mono - pair, one colour per target."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"untrained": "tab:gray", "mono": "black", "low": "tab:blue", "high": "tab:red"}
    for x, target in enumerate(summary["targets"]):
        entries = [("untrained", target["untrained"]), ("mono", target["mono"])]
        entries += [("low", row) for row in target["low"]] + [("high", row) for row in target["high"]]
        offsets = np.linspace(-0.3, 0.3, len(entries))
        for offset, (kind, entry) in zip(offsets, entries):
            low, high = entry["ci"]
            accuracy = entry["accuracy"]
            left.errorbar(x + offset, 100 * accuracy, yerr=[[100 * (accuracy - low)], [100 * (high - accuracy)]],
                          fmt="o", color=styles[kind], capsize=2, label=kind if x == 0 else None)
        left.hlines(100 * target["majority_class_rate"], x - 0.35, x + 0.35, colors="tab:gray", linestyles=":")
    left.set_xticks(range(len(summary["targets"])), [t["target"] for t in summary["targets"]])
    left.set_ylabel("SIB-200 topic accuracy (%)")
    left.set_title("Accuracy by partner (dotted: majority class)", fontsize=10)
    left.legend(fontsize=7)
    points, correlation = summary["correlation"]["points"], summary["correlation"]
    for target in dict.fromkeys(q["target"] for q in points):
        mine = [q for q in points if q["target"] == target]
        right.scatter([q["interference"] for q in mine], [100 * q["drop"] for q in mine], label=target, s=30)
    right.axhline(0, color="gray", linewidth=0.8)
    right.set_xlabel("I[A,B] (more negative = more interference)")
    right.set_ylabel("accuracy drop mono - pair (points)")
    right.set_title(f"Spearman rho = {correlation['rho']:+.2f}, p = {correlation['p']:.3g}, "
                    f"{correlation['pairs']} pairs", fontsize=10)
    right.legend(fontsize=7)
    return save_figure(fig, path, bbox_inches="tight")
