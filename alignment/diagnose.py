"""Where in the model do languages drift apart? Per-layer similarity of translation pairs.

For each language, translations of the same sentences are compared with the
target language (default English) at every layer: mean cosine of the pairs and
retrieval P@1 (does a sentence find its own translation among all of them).
Layers where similarity is high but not perfect are where an alignment map has
room to help (arXiv 2502.04269).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignment.evaluate import LayerPanel, layer_curves, mean_pair_cosine, plot_layer_curves, retrieval_p1
from lingosteer.files import write_text_atomic
from lingosteer.markdown import markdown_table


def diagnose_languages(pair_states: dict[str, tuple[np.ndarray, np.ndarray]], target: str, layers: list[int]) -> dict:
    """`pair_states[lang] = (X_lang, X_target)`: states [n_layers, n, d] of n translation pairs."""
    result = {"target": target, "layers": list(layers), "languages": {}}
    for lang, (X, Y) in pair_states.items():
        if X.shape != Y.shape or X.shape[0] != len(layers):
            raise ValueError(f"{lang}: states of shape {X.shape} and {Y.shape} for {len(layers)} layers")
        result["languages"][lang] = {
            "num_pairs": int(X.shape[1]),
            "cosine": [mean_pair_cosine(X[i], Y[i]) for i in range(len(layers))],
            "p1": [retrieval_p1(X[i], Y[i]) for i in range(len(layers))],
        }
    return result


def write_diagnosis_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """diagnose.json, diagnose.md (one table per measure) and diagnose.png in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "diagnose.json", "markdown": out_dir / "diagnose.md", "plot": out_dir / "diagnose.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=2) + "\n")
    languages = list(report["languages"])
    sections = []
    for measure, label in (("cosine", "Mean cosine of translation pairs"),
                           ("p1", "Retrieval P@1 (language -> target)")):
        rows = [[layer] + [f"{report['languages'][lang][measure][i]:.3f}" for lang in languages]
                for i, layer in enumerate(report["layers"])]
        sections.append(f"## {label}\n\n" + markdown_table(["layer"] + languages, rows))
    sizes = sorted({report["languages"][lang]["num_pairs"] for lang in languages})
    title = f"similarity to {report['target']} per layer, {'/'.join(map(str, sizes))} sentence pairs"
    write_text_atomic(paths["markdown"], f"# Cross-lingual {title}\n\n" + "\n\n".join(sections) + "\n")
    layers = report["layers"]
    plot_layer_curves(
        paths["plot"],
        [
            LayerPanel("mean cosine of pairs",
                       layer_curves(layers, {lang: report["languages"][lang]["cosine"] for lang in languages})),
            LayerPanel("retrieval P@1",
                       layer_curves(layers, {lang: report["languages"][lang]["p1"] for lang in languages})),
        ],
        title,
    )
    return paths
