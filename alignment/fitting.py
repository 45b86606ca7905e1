"""A recipe -> an artifact: parallel sentences, the sufficient statistics of a fit (in one
process or on Ray), the solved maps, the artifact with what it was fitted on.

Hidden-state extraction dominates a fit's time, and its statistics add exactly
(`SufficientStats`), so a fit shards: each shard extracts the states of its own
pairs and accumulates their statistics, with the pairs' global ids so that the
held-out routing is that of the whole corpus; merged, the shards hold exactly the
statistics of a single-process pass. Solving is cheap (O(L d^3)).

`fit_artifact` runs a whole recipe; scripts that compute statistics their own way
(cached states, statistics shared between fits) solve and save with `write_fit`, so
every artifact records its fit the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import alignment
import lingosteer
from alignment.artifact import FitData, TaskItems, save_intervention
from alignment.estimator import LinearAligner
from alignment.hidden_states import extract_hidden_states, load_model_and_tokenizer
from alignment.recipe import Recipe
from lingosteer.data import code_switched, parse_parallel_source
from lingosteer.fingerprint import model_fingerprint
from lingosteer.models import resolve_model
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


@dataclass(frozen=True)
class Compute:
    """How a fit runs (not what it fits): batches, chunks, Ray."""

    batch_size: int = 16
    chunk_size: int = 256
    ray_address: str | None = None  # "local": a local Ray; None: no Ray
    workers: int = 2  # Ray shards, with ray_address

    def __post_init__(self):
        if self.chunk_size < 1 or self.batch_size < 1:
            raise ValueError("chunk size and batch size must be positive")
        if self.ray_address is not None and self.workers < 1:
            raise ValueError("Ray workers must be at least 1")


def recipe_pairs(recipe: Recipe, source: str, target: str, skip_missing: bool = False) -> tuple[list[dict], list]:
    """(each source found, described, with its spec and how many pairs it gave; the pairs, the first
    `recipe.max_pairs` of them, code-switched if the recipe says so). With `skip_missing`, a corpus
    that lacks the language is left out (and said so) rather than refused: the recommended recipe's
    corpora do not cover every language (NTREX has no Haitian Creole)."""
    if recipe.max_pairs is not None and recipe.max_pairs < 2:
        raise ValueError("max_pairs must be at least 2")
    sources, pairs = [], []
    for spec in recipe.data:
        data = parse_parallel_source(spec)
        try:
            found = data.pairs(source, target)
        except FileNotFoundError as error:
            if not skip_missing:
                raise
            print(f"warning: {spec} left out: {error}", file=sys.stderr)
            continue
        taken = found if recipe.max_pairs is None else found[: recipe.max_pairs - len(pairs)]
        sources.append({**data.describe(), "spec": spec, "pairs": len(taken)})
        pairs += taken
    if len(pairs) < 2:
        raise ValueError(f"{' + '.join(recipe.data)}: only {len(pairs)} {source}-{target} pairs; need at least 2")
    return sources, code_switched(pairs) if recipe.code_switch else pairs


def fit_artifact(recipe: Recipe, model: str | Path, source: str, target: str, out: Path, *, name: str,
                 skip_missing: bool = False, compute: Compute = Compute(), dtype: str = "float32",
                 alpha: float = 1.0, overwrite: bool = False) -> Path:
    """Fit `recipe`'s maps source -> target on `model` (a prepared name or a directory) and write
    the artifact to `out`, recorded as recipe `name`."""
    if source == target:
        raise ValueError(f"source and target are the same language ({source})")
    recipe.aligner()  # settings that do not apply to the solver fail here, before the slow part
    sources, pairs = recipe_pairs(recipe, source, target, skip_missing)
    model_dir = resolve_model(model)
    fingerprint = model_fingerprint(model_dir)
    layers = list(recipe.layers or range(fingerprint["num_hidden_layers"]))
    settings = ExtractionSettings(layers=tuple(layers), pooling=recipe.pooling, batch_size=compute.batch_size,
                                  chunk_size=compute.chunk_size, holdout_fraction=recipe.holdout_fraction)
    statistics = fit_statistics(model_dir, pairs, settings, ray_address=compute.ray_address,
                                workers=compute.workers if compute.ray_address is not None else 0)
    aligner = recipe.aligner().merge(statistics).solve()
    write_fit(recipe, aligner, out, name=name, fingerprint=fingerprint, source=source, target=target,
              layers=layers, sources=sources, dtype=dtype, alpha=alpha, overwrite=overwrite)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({source} -> {target}, {len(layers)} layers, {len(pairs)} pairs, {recipe.solver}, "
          f"recipe {name}, {size:,} bytes)", file=sys.stderr)
    return out


def write_fit(recipe: Recipe, aligner: LinearAligner, out: Path, *, name: str, fingerprint: dict, source: str,
              target: str, layers: list[int], sources: list[dict], task_items: TaskItems | None = None,
              dtype: str = "float32", alpha: float = 1.0, overwrite: bool = False) -> Path:
    """Save `aligner` (solved, fitted by `recipe` on `sources`) as an artifact, with the fit data and
    metrics every fit records."""
    bytes_per_value = 4 if dtype == "float32" else 2
    metrics = {
        "heldout_error_ratio": {str(layer): None if np.isnan(r) else float(r)
                                for layer, r in zip(layers, aligner.heldout_error_ratio_)},
        "heldout_error_ratio_meaning": "held-out squared distance left by the map fitted without the held-out "
                                       "pairs, over that left by no intervention (lower is better)",
        "parameter_bytes": aligner.parameter_bytes(bytes_per_value),
    }
    fit_data = FitData(sources=sources, num_pairs=int(aligner.n_samples_), num_heldout=int(aligner.heldout_stats_.n),
                       max_pairs=recipe.max_pairs, code_switched=recipe.code_switch, recipe=name,
                       task_items=task_items)
    return save_intervention(out, aligner, fingerprint=fingerprint, source=source, target=target, layers=layers,
                             pooling=recipe.pooling, fit_data=fit_data, metrics=metrics, dtype=dtype, form=recipe.form,
                             alpha=alpha, overwrite=overwrite)
