"""Choosing alpha per language from calibration items only.

`choose_alpha` sees nothing but the correctness of calibration items under each
alpha of the grid; the runner never hands it evaluation items. The rule: highest
calibration accuracy; ties go to the smaller |alpha| (the weaker intervention, so
alpha 0 = no intervention wins any tie it is part of), then to the negative one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from alignment.artifact import ALPHA_LIMIT, ServingDefaults
from lingosteer.stats import bootstrap_delta_ci

Candidate = TypeVar("Candidate", bound=Hashable)

DEFAULT_GRID = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)  # INCLINE swept -1..1


def parse_grid(text: str) -> tuple[float, ...]:
    """'-1,-0.5,0,0.5,1' -> sorted distinct alphas within what a request may ask: [-ALPHA_LIMIT, ALPHA_LIMIT]."""
    try:
        grid = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"bad alpha grid {text!r}: give comma-separated numbers, e.g. -1,-0.5,0,0.5,1") from None
    if not grid or any(not -ALPHA_LIMIT <= a <= ALPHA_LIMIT for a in grid):
        raise ValueError(f"alpha grid {text!r} must hold numbers within [{-ALPHA_LIMIT:g}, {ALPHA_LIMIT:g}]")
    return tuple(grid)


def choose_alpha(grid: tuple[float, ...], correct: np.ndarray) -> tuple[float, list[float]]:
    """The chosen alpha and the accuracy of each grid alpha; `correct` is [len(grid), n_items] bool."""
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or correct.shape[0] != len(grid) or correct.shape[1] == 0:
        raise ValueError(f"correct must be [len(grid)={len(grid)}, n>0], got shape {correct.shape}")
    accuracy = correct.mean(axis=1)
    best = min(range(len(grid)), key=lambda i: (-accuracy[i], abs(grid[i]), grid[i]))
    return float(grid[best]), [float(a) for a in accuracy]


def contiguous_folds(n: int, k: int) -> list[np.ndarray]:
    """k contiguous blocks of item indices (sizes differ by at most one): 'halves' for k = 2."""
    if k < 2 or k > n:
        raise ValueError(f"cannot split {n} items into {k} folds (need 2 <= folds <= items)")
    return [block for block in np.array_split(np.arange(n), k)]


def cross_validate(correct: Mapping[Candidate, np.ndarray], choose: Callable[[np.ndarray], Candidate],
                   folds: int) -> tuple[np.ndarray, list[Candidate]]:
    """Choose on the other folds, score the held-out fold, for each of `folds` `contiguous_folds`.

    `correct` maps each candidate to its per-item correctness ([n] bool, the same items for all);
    `choose(indices)` picks a candidate seeing only the items at `indices` (the other folds'). Returns
    the held-out correctness [n] (each item scored under the candidate chosen without it) and the
    candidate chosen for each fold.
    """
    sizes = {np.shape(row) for row in correct.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise ValueError(f"correct must map candidates to [n] arrays over the same items, got shapes {sizes}")
    n = next(iter(sizes))[0]
    held_out = np.empty(n, dtype=bool)
    chosen = []
    for fold in contiguous_folds(n, folds):
        candidate = choose(np.setdiff1d(np.arange(n), fold))
        held_out[fold] = correct[candidate][fold]
        chosen.append(candidate)
    return held_out, chosen


# ---- serving defaults: the search and the gate of `lingosteer align build` ---------------

MIN_CALIBRATION_ITEMS = 40
CALIBRATION_FOLDS = 5
SEARCH_ALPHAS = (-1.0, -0.5, 0.5, 1.0)
SEARCH_POSITIONS = ("last", "prompt")
# Written before any calibration was run; docs/benchmarks.md quotes it.
GATE_RULE = (
    f"Candidates: alpha in {SEARCH_ALPHAS} x layers in (all, the middle third, the middle layer) x positions in "
    f"{SEARCH_POSITIONS}. Cross-validation over {CALIBRATION_FOLDS} contiguous folds of the calibration items: "
    "for each fold, the candidate with the highest accuracy on the other folds is chosen (ties: smaller |alpha|, "
    "then fewer layers, then 'last'), and the fold's items are scored under it. The steered configuration is "
    "adopted only if the lower end of the 95% paired bootstrap CI of (cross-validated accuracy - plain accuracy) "
    "is above 0; the adopted configuration is the one chosen on all calibration items. Otherwise serving is off "
    "(alpha 0)."
)


def search_space(layers: list[int]) -> list[ServingDefaults]:
    """GATE_RULE's candidates for an artifact with these layers."""
    layers = sorted(layers)
    third = max(1, len(layers) // 3)
    layer_sets = dict.fromkeys([tuple(layers), tuple(layers[third : len(layers) - third] or layers),
                                (layers[len(layers) // 2],)])
    return [ServingDefaults(alpha=alpha, layers=layer_set, positions=positions)
            for layer_set in layer_sets for positions in SEARCH_POSITIONS for alpha in SEARCH_ALPHAS]


@dataclass
class ServingChoice:
    """The outcome of the gate: the serving defaults and the evidence for them."""

    adopted: bool
    config: ServingDefaults | None  # chosen on all calibration items (None: serving is off)
    plain_accuracy: float
    cross_validated_accuracy: float
    delta_ci95: tuple[float, float]
    fold_choices: list[str]
    candidate_accuracy: dict[str, float]


def choose_serving(correct: dict[ServingDefaults, np.ndarray], plain: np.ndarray,
                   folds: int = CALIBRATION_FOLDS, seed: int = 0, resamples: int = 10000) -> ServingChoice:
    """GATE_RULE, applied to each candidate's per-item correctness and the plain run's.

    `resamples` of the bootstrap: fewer keep simulations of the gate on thousands of items affordable."""
    plain = np.asarray(plain, dtype=bool)
    n = plain.size
    if n < MIN_CALIBRATION_ITEMS:
        raise ValueError(f"{n} calibration items are too few for the gate: at least {MIN_CALIBRATION_ITEMS} needed")
    candidates = list(correct)

    def best(items: np.ndarray) -> ServingDefaults:
        return min(candidates, key=lambda c: (-correct[c][items].mean(), *c.weakness()))

    cross_validated, chosen = cross_validate(correct, best, folds)
    low, high = bootstrap_delta_ci([(plain, cross_validated)], resamples=resamples, seed=seed)
    adopted = low > 0
    return ServingChoice(
        adopted=adopted, config=best(np.arange(n)) if adopted else None,
        plain_accuracy=float(plain.mean()), cross_validated_accuracy=float(cross_validated.mean()),
        delta_ci95=(low, high), fold_choices=[c.describe() for c in chosen],
        candidate_accuracy={c.describe(): float(correct[c].mean()) for c in candidates},
    )


def choose_across_languages(gains: Mapping[str, Mapping[ServingDefaults, float]]) -> dict[str, ServingDefaults]:
    """One configuration for all languages, judged on languages it was not chosen on.

    `gains[language][candidate]` = candidate accuracy - plain accuracy on that language's
    calibration items. For each language, the candidate with the highest mean gain over the
    *other* languages (ties as GATE_RULE's): that language's gain under it estimates what a
    configuration shared across languages would do for a language it was not chosen on.
    """
    if len(gains) < 2:
        raise ValueError(f"choosing across languages needs 2 or more languages, got {len(gains)}")
    candidates = set.intersection(*(set(row) for row in gains.values()))
    if not candidates:
        raise ValueError("the languages share no candidate configuration")
    return {language: min(candidates, key=lambda c: (-np.mean([gains[other][c] for other in gains
                                                                 if other != language]), *c.weakness()))
            for language in gains}
