"""Language embeddings for the completion proxy: the mean sentence representation of each language.

The paper tested whether sentence-embedding similarity (SONAR, MEXMA) predicts
interference; offline we use a causal LM's residual stream instead: each
language's SIB-200 test sentences (the same FLORES sentences in every language),
mean-pooled over tokens at one decoder layer (default: the middle one, where
multilingual models are most language-neutral), then averaged over sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignment.hidden_states import extract_hidden_states, load_model_and_tokenizer
from lingosteer.data import load_sib200
from lingosteer.models import resolve_model


def language_embeddings(
    languages: tuple[str, ...],
    model: str | Path,
    data_dir: str | Path | None = None,
    layer: int | None = None,
    sentences: int = 100,
) -> tuple[np.ndarray, dict]:
    """([n_languages, hidden] mean embeddings, description for the report)."""

    model_dir = resolve_model(model)
    num_layers = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers")
    layer = num_layers // 2 if layer is None else layer
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside the model's {num_layers} decoder layers")
    loaded, tokenizer = load_model_and_tokenizer(model_dir)
    means = []
    for language in languages:
        texts = [row.text for row in load_sib200(language, splits=("test",), data_dir=data_dir)[:sentences]]
        states = extract_hidden_states(loaded, tokenizer, texts, layers=[layer], pooling="mean", progress=False)
        means.append(states[0].mean(axis=0))
    description = (
        f"Embedding proxy: cosine similarity of mean-pooled layer-{layer} residual states of {model_dir.name} "
        f"over the first {sentences} SIB-200 test sentences of each language."
    )
    return np.stack(means), {"model": str(model_dir), "layer": layer, "sentences": sentences, "note": description}
