"""A sweep design whose cost grows linearly: every monolingual run plus k partner runs per language.

The full design trains N + N(N-1)/2 models. The partial design trains the N monolingual
runs and, for each language, pair runs with at least k partners chosen by `choose_partners`
(at most N + N k runs); `matrix/completion.py` predicts the pairs it skips. A pair run
measures both directions, I[A,B] and I[B,A], so a pair chosen by one language counts as a
partner of both.

`validate_design` measures what the partial design loses on a block measured in full: it
hides every pair the design at k would not have run, completes the matrix from the rest,
and scores the completed entries against the measured ones. `choose_k` is the rule that
picks k from that table; it was written down (here and in docs/sweep.md) before the table
was computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from lingosteer.languages import get_language
from matrix.completion import fit_completion

# The pre-declared rule (docs/sweep.md): the smallest k whose completed entries, on the fully
# measured block, have MAE <= 0.01 and Spearman >= 0.8; k is at most 5, so runs <= 6 N.
MAX_PARTNERS = 5
TARGET_MAE = 0.01
TARGET_SPEARMAN = 0.8


def _labels(language: str) -> tuple[str, str, str]:
    found = get_language(language)
    return found.script, found.family, found.resource


def choose_partners(languages: tuple[str, ...] | list[str], k: int) -> list[tuple[str, str]]:
    """The unordered pairs (sorted) of the partial design at k partners per language.

    Languages are visited in sorted order. Each one that has fewer than k partners (pairs
    chosen by languages before it count) adds partners until it has k, covering in turn:
    a language of its script, one of its family, one of the other NLLB resource level
    (each skipped if a partner already covers it or no language qualifies), then languages
    of scripts and families its partners do not cover yet. Among candidates it takes the
    one with the fewest partners so far (spreading the runs), then the first code.
    """
    if k < 1:
        raise ValueError(f"partners per language must be at least 1, got {k}")
    languages = sorted(languages)
    if k > len(languages) - 1:
        raise ValueError(f"{k} partners per language need at least {k + 1} languages, got {len(languages)}")
    labels = {code: _labels(code) for code in languages}
    partners: dict[str, set[str]] = {code: set() for code in languages}

    def criteria(code):
        script, family, resource = labels[code]
        return [
            lambda other: labels[other][0] == script,
            lambda other: bool(family) and labels[other][1] == family,
            lambda other: bool(resource) and labels[other][2] not in ("", resource),
        ]

    def add(code, other):
        partners[code].add(other)
        partners[other].add(code)

    for code in languages:
        for wanted in criteria(code):
            if len(partners[code]) >= k or any(wanted(p) for p in partners[code]):
                continue
            candidates = [o for o in languages if o != code and o not in partners[code] and wanted(o)]
            if candidates:
                add(code, min(candidates, key=lambda o: (len(partners[o]), o)))
        while len(partners[code]) < k:
            scripts = {labels[p][0] for p in partners[code]} | {labels[code][0]}
            families = {labels[p][1] for p in partners[code]} | {labels[code][1]}
            candidates = [o for o in languages if o != code and o not in partners[code]]
            add(code, min(candidates, key=lambda o: (labels[o][0] in scripts, labels[o][1] in families,
                                                     len(partners[o]), o)))
    return sorted({tuple(sorted((a, b))) for a in languages for b in partners[a]})


@dataclass(frozen=True)
class DesignCost:
    languages: int
    partners_per_language: int | None  # None: the full design
    runs: int
    full_runs: int

    def hours(self, seconds_per_run: float) -> float:
        return self.runs * seconds_per_run / 3600


def design_cost(languages: tuple[str, ...] | list[str], k: int | None) -> DesignCost:
    n = len(languages)
    full = n + n * (n - 1) // 2
    runs = full if k is None else n + len(choose_partners(languages, k))
    return DesignCost(n, k, runs, full)


def design_mask(languages: tuple[str, ...] | list[str], pairs: list[tuple[str, str]]) -> np.ndarray:
    """n x n boolean: True on the diagonal and at both directions of every pair run."""
    index = {code: i for i, code in enumerate(languages)}
    mask = np.eye(len(languages), dtype=bool)
    for a, b in pairs:
        mask[index[a], index[b]] = mask[index[b], index[a]] = True
    return mask


def complete(interference: np.ndarray, languages: tuple[str, ...] | list[str]) -> np.ndarray:
    """The matrix with its unmeasured (NaN) entries predicted from the measured ones and the languages'
    script and family; measured entries are kept as they are."""
    scripts, families = zip(*((s, f) for s, f, _ in map(_labels, languages)))
    predicted = fit_completion(interference, list(scripts), list(families)).predict()
    return np.where(np.isnan(interference), predicted, interference)


@dataclass(frozen=True)
class DesignScore:
    k: int | None  # None: pairs left out one at a time (`leave_one_pair_out`)
    runs: int
    full_runs: int
    hidden_entries: int
    mae: float
    spearman: float
    random_mae: float | None = None  # mean MAE of random designs with as many pairs (each language >= 1)

    @property
    def meets_targets(self) -> bool:
        return self.mae <= TARGET_MAE and self.spearman >= TARGET_SPEARMAN


def _score(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    mae = float(np.mean(np.abs(predicted - truth)))
    rho = float(spearmanr(predicted, truth).statistic) if truth.size > 2 else float("nan")
    return mae, rho


def _random_design_mae(interference, languages, pair_count, draws, rng) -> float:
    n = len(languages)
    all_pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    errors = []
    while len(errors) < draws:
        chosen = [all_pairs[i] for i in rng.choice(len(all_pairs), size=pair_count, replace=False)]
        if len({i for pair in chosen for i in pair}) < n:
            continue  # a language without any pair has no row to complete from
        keep = design_mask(languages, [(languages[a], languages[b]) for a, b in chosen])
        hidden = ~keep
        errors.append(_score(complete(np.where(keep, interference, np.nan), languages)[hidden],
                             interference[hidden])[0])
    return float(np.mean(errors))


def validate_design(interference: np.ndarray, languages: tuple[str, ...], ks=range(1, MAX_PARTNERS + 1),
                    random_draws: int = 20, seed: int = 0) -> list[DesignScore]:
    """On a fully measured matrix: for each k, hide the pairs the design would skip, complete, score the
    hidden entries (both directions of each skipped pair); beside it, random designs of as many pairs."""
    if np.isnan(interference).any():
        raise ValueError("design validation needs a block measured in full (no missing entries)")
    rng = np.random.default_rng(seed)
    scores = []
    for k in ks:
        if k > len(languages) - 2:
            break  # the design would measure every pair: nothing left to hide
        pairs = choose_partners(languages, k)
        keep = design_mask(languages, pairs)
        hidden = ~keep
        mae, rho = _score(complete(np.where(keep, interference, np.nan), languages)[hidden], interference[hidden])
        cost = design_cost(languages, k)
        scores.append(DesignScore(k, cost.runs, cost.full_runs, int(hidden.sum()), mae, rho,
                                  _random_design_mae(interference, languages, len(pairs), random_draws, rng)))
    return scores


def choose_k(scores: list[DesignScore]) -> int:
    """The pre-declared rule: the smallest k meeting both targets; MAX_PARTNERS if none does."""
    meeting = [score.k for score in scores if score.meets_targets]
    return min(meeting) if meeting else MAX_PARTNERS


def leave_one_pair_out(interference: np.ndarray, languages: tuple[str, ...]) -> DesignScore:
    """The completion's expected error on a partial sweep itself: hide each measured pair in turn
    (both directions), complete from the others, score the hidden entries."""
    n = len(languages)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)
             if not (math.isnan(interference[a, b]) or math.isnan(interference[b, a]))]
    if len(pairs) < 3:
        raise ValueError(f"only {len(pairs)} measured pairs: too few to estimate the completion's error")
    predicted, truth = [], []
    for a, b in pairs:
        train = interference.copy()
        train[a, b] = train[b, a] = np.nan
        filled = complete(train, languages)
        predicted += [filled[a, b], filled[b, a]]
        truth += [interference[a, b], interference[b, a]]
    mae, rho = _score(np.array(predicted), np.array(truth))
    return DesignScore(None, n + len(pairs), n + n * (n - 1) // 2, len(truth), mae, rho)
