"""How well an intervention aligns held-out translation pairs, layer by layer.

Per layer, on parallel sentences never used for fitting:
- mean cosine between each source state and its translation's target state,
  before and after mapping the source states;
- retrieval precision@1: for each source sentence, is its own translation the
  nearest target (inner product of L2-normalised vectors, faiss IndexFlatIP)?
  Source->target and target->source, before and after.
Cosine on raw mean-pooled states is dominated by directions shared by all
sentences, so retrieval is the measure that shows whether translations find
each other; cosine shows how far the states moved.

Every figure also comes per-language mean-centred (keys ending in `_centred`):
each side's mean over the evaluated sentences is subtracted first, the usual
correction for anisotropic LLM states (the shared component makes a few
"hub" targets nearest to every query). The uncentred keys keep their meaning.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lingosteer.figures import pyplot, save_figure
from lingosteer.files import write_text_atomic
from lingosteer.markdown import markdown_table


def mean_pair_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine of row i of `a` with row i of `b`."""
    a = _normalise(a)
    b = _normalise(b)
    return float(np.mean(np.sum(a * b, axis=1)))


def retrieval_p1(queries: np.ndarray, keys: np.ndarray) -> float:
    """Fraction of queries whose nearest key (cosine) is the key with the same index."""
    import faiss

    keys = _normalise(keys)
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    _, nearest = index.search(_normalise(queries), 1)
    return float(np.mean(nearest[:, 0] == np.arange(len(queries))))


def retrieval_hits(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Per query (bool [n]): is its nearest key (cosine) the key with the same index? `retrieval_p1` is
    their mean; per query, they are what a bootstrap over sentences resamples."""
    import faiss

    keys = _normalise(keys)
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    _, nearest = index.search(_normalise(queries), 1)
    return nearest[:, 0] == np.arange(len(queries))


def retrieval_p1_raw_and_centred(queries: np.ndarray, keys: np.ndarray, name: str) -> dict[str, float]:
    """{name: P@1 of `queries` against `keys`, name + "_centred": the same with each side's mean removed}.

    With the unmapped source states as queries this is the "before" of any map (`p1_before`), with
    mapped ones its "after", at the cost of two searches rather than `layer_metrics`' twelve.
    """
    return {name: retrieval_p1(queries, keys),
            f"{name}_centred": retrieval_p1(queries - queries.mean(axis=0), keys - keys.mean(axis=0))}


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


METRICS = ("cosine_before", "cosine_after", "p1_before", "p1_after", "p1_tgt_to_src_before", "p1_tgt_to_src_after")


def layer_metrics(src: np.ndarray, mapped: np.ndarray, tgt: np.ndarray) -> dict:
    """Every `METRICS` figure of one layer, uncentred and (`*_centred`) mean-centred."""
    metrics = {}
    for suffix, center in (("", lambda x: x), ("_centred", lambda x: x - x.mean(axis=0))):
        s, m, t = center(src), center(mapped), center(tgt)
        metrics.update({
            f"cosine_before{suffix}": mean_pair_cosine(s, t),
            f"cosine_after{suffix}": mean_pair_cosine(m, t),
            f"p1_before{suffix}": retrieval_p1(s, t),
            f"p1_after{suffix}": retrieval_p1(m, t),
            f"p1_tgt_to_src_before{suffix}": retrieval_p1(t, s),
            f"p1_tgt_to_src_after{suffix}": retrieval_p1(t, m),
        })
    return metrics


def evaluate_intervention(intervention, X_src: np.ndarray, X_tgt: np.ndarray, alpha: float = 1.0) -> dict:
    """Metrics per layer of `intervention` (states [n_layers, n, d] in its layer order)."""
    layers = intervention.layers
    if X_src.shape != X_tgt.shape or X_src.shape[0] != len(layers):
        raise ValueError(f"expected source/target states [{len(layers)}, n, d], got {X_src.shape} and {X_tgt.shape}")
    if X_src.shape[1] < 2:
        raise ValueError("evaluation needs at least 2 sentence pairs")
    rows = [{"layer": layer, **layer_metrics(X_src[i], intervention.apply(X_src[i], layer, alpha=alpha), X_tgt[i])}
            for i, layer in enumerate(layers)]
    return {
        "source": intervention.source,
        "target": intervention.target,
        "alpha": alpha,
        "num_pairs": int(X_src.shape[1]),
        "layers": rows,
    }


def write_eval_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """eval.json, eval.md and eval.png in `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["layers"]
    paths = {"json": out_dir / "eval.json", "markdown": out_dir / "eval.md", "plot": out_dir / "eval.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=2) + "\n")
    title = f"{report['source']} -> {report['target']}, {report['num_pairs']} held-out pairs, alpha {report['alpha']}"
    header = ["layer", "cos before", "cos after", "P@1 s->t before", "P@1 s->t after", "P@1 t->s before",
              "P@1 t->s after"]
    tables = [markdown_table(header, [[r["layer"]] + [f"{r[k + suffix]:.3f}" for k in METRICS] for r in rows])
              for suffix in ("", "_centred")]
    write_text_atomic(paths["markdown"], f"# Alignment evaluation: {title}\n\n## Raw states\n\n{tables[0]}\n\n"
                                         f"## Mean-centred states (each side's mean removed)\n\n{tables[1]}\n")
    layers = [r["layer"] for r in rows]
    plot_layer_curves(
        paths["plot"],
        [
            LayerPanel("mean cosine of pairs", layer_curves(layers, {"before": [r["cosine_before"] for r in rows],
                                                                     "after": [r["cosine_after"] for r in rows]})),
            *[LayerPanel(f"retrieval P@1{label}", layer_curves(layers, {
                "src->tgt before": [r["p1_before" + suffix] for r in rows],
                "src->tgt after": [r["p1_after" + suffix] for r in rows],
                "tgt->src before": [r["p1_tgt_to_src_before" + suffix] for r in rows],
                "tgt->src after": [r["p1_tgt_to_src_after" + suffix] for r in rows],
            })) for suffix, label in (("", ""), ("_centred", " (mean-centred)"))],
        ],
        title,
    )
    return paths


def best_layer_row(rows: list[dict], suffix: str = "") -> dict:
    """The layer whose P@1 after mapping is highest (raw, or centred with suffix "_centred")."""
    return max(rows, key=lambda r: r["p1_after" + suffix])


def write_compare_report(comparison: dict, out_dir: str | Path) -> dict[str, Path]:
    """compare.json, compare.md (best layer of each intervention) and compare.png (P@1 per layer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "compare.json", "markdown": out_dir / "compare.md", "plot": out_dir / "compare.png"}
    write_text_atomic(paths["json"], json.dumps(comparison, indent=2) + "\n")
    rows = []
    for item in comparison["interventions"]:
        raw, centred = best_layer_row(item["layers"]), best_layer_row(item["layers"], "_centred")
        solver = item["solver"] + (" (standardised)" if item.get("standardise") else "")
        rows.append([item["intervention"], solver, item["pooling"], f"{item['bytes']:,}", raw["layer"],
                     f"{raw['p1_before']:.3f}", f"{raw['p1_after']:.3f}", f"{raw['p1_after'] - raw['p1_before']:+.3f}",
                     f"{centred['p1_before_centred']:.3f}", f"{centred['p1_after_centred']:.3f}"])
    header = ["intervention", "solver", "pooling", "bytes", "best layer", "P@1 before", "P@1 after", "gain",
              "centred before", "centred after"]
    write_text_atomic(paths["markdown"], f"# Interventions compared on {comparison['data']}\n\n"
                                         f"{markdown_table(header, rows)}\n")
    curves = [LayerCurve(Path(item["intervention"]).name, [r["layer"] for r in item["layers"]],
                         [r["p1_after"] for r in item["layers"]]) for item in comparison["interventions"]]
    plot_layer_curves(paths["plot"], [LayerPanel("P@1 source->target after mapping", curves,
                                                 title=f"on {comparison['data']}")])
    return paths


@dataclass(frozen=True)
class LayerCurve:
    """One line of a per-layer plot: `values[i]` at layer `layers[i]`. A `reference` (such as "no map") is
    drawn grey and dashed without markers, so that the curves it is compared with stand out."""

    label: str
    layers: Sequence[int]
    values: Sequence[float]
    reference: bool = False


@dataclass(frozen=True)
class LayerPanel:
    """One axes of a per-layer plot: its y label, its curves and, where the panels differ by more than
    the y label, a title of its own."""

    ylabel: str
    curves: Sequence[LayerCurve]
    title: str = ""


def layer_curves(layers: Sequence[int], values: dict[str, Sequence[float]]) -> list[LayerCurve]:
    """{label: value per layer} as curves that share `layers`."""
    return [LayerCurve(label, layers, curve) for label, curve in values.items()]


def plot_layer_curves(path: Path, panels: Sequence[LayerPanel], title: str = "") -> None:
    """The panels side by side, layers on the x axis, saved as PNG (atomically); `title` heads the figure."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for curve in panel.curves:
            style = dict(color="grey", linestyle="--") if curve.reference else dict(marker="o", markersize=3)
            ax.plot(curve.layers, curve.values, label=curve.label, **style)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (output of decoder layer)")
        ax.set_ylabel(panel.ylabel)
        if panel.title:
            ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
