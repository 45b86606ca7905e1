"""From parallel sentences to the sufficient statistics of a fit, in one process or on Ray.

Hidden-state extraction dominates a fit's time, and its statistics add exactly
(`SufficientStats`), so a fit shards: each shard extracts the states of its own
pairs and accumulates their statistics, with the pairs' global ids so that the
held-out routing is that of the whole corpus; merged, the shards hold exactly the
statistics of a single-process pass. Solving stays in the caller (cheap, O(L d^3)).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import alignment
import lingosteer
from alignment.estimator import LinearAligner
from alignment.hidden_states import extract_hidden_states, load_model_and_tokenizer
from lingosteer.ray_runtime import ray_session


@dataclass(frozen=True)
class ExtractionSettings:
    """How states are read from the model for a fit."""

    layers: tuple[int, ...]
    pooling: str = "mean"
    batch_size: int = 16
    chunk_size: int = 256  # pairs per extraction chunk: memory does not grow with the data
    holdout_fraction: float = 0.2


def accumulate_statistics(model_dir: str | Path, pairs: list[tuple[str, str]], sample_ids: np.ndarray,
                          settings: ExtractionSettings, progress: bool = True):
    """An unsolved `LinearAligner` holding the statistics of `pairs` (ids `sample_ids`)."""
    from tqdm.auto import tqdm


    model, tokenizer = load_model_and_tokenizer(model_dir)
    aligner = LinearAligner(holdout_fraction=settings.holdout_fraction)
    chunks = range(0, len(pairs), settings.chunk_size)
    for start in tqdm(chunks, desc="fit chunks", unit="chunk", disable=not progress or len(chunks) == 1):
        chunk = pairs[start : start + settings.chunk_size]
        states = [extract_hidden_states(model, tokenizer, [pair[side] for pair in chunk], layers=settings.layers,
                                        pooling=settings.pooling, batch_size=settings.batch_size,
                                        progress=progress and len(chunks) == 1)
                  for side in (0, 1)]
        aligner.partial_fit(*states, sample_ids=sample_ids[start : start + len(chunk)])
    return aligner


def fit_statistics(model_dir: str | Path, pairs: list[tuple[str, str]], settings: ExtractionSettings,
                   ray_address: str | None = None, workers: int = 0, progress: bool = True):
    """The statistics of all `pairs`: in this process (`workers` 0), or as `workers` Ray tasks
    (local Ray when `ray_address` is "local", else the cluster at that address)."""
    ids = np.arange(len(pairs))
    if workers == 0:
        return accumulate_statistics(model_dir, pairs, ids, settings, progress)
    if workers < 0 or workers > len(pairs):
        raise ValueError(f"cannot cut {len(pairs)} pairs into {workers} Ray shards")

    shards = np.array_split(ids, workers)
    address = None if ray_address == "local" else ray_address
    with ray_session(address, num_cpus=workers, packages=(alignment, lingosteer)) as ray:
        task = ray.remote(num_cpus=1)(accumulate_statistics)
        futures = [task.remote(str(model_dir), [pairs[i] for i in shard], shard, settings, False) for shard in shards]
        parts = ray.get(futures)
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return merged
