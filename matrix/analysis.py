"""Statistics of an interference matrix (pure functions: arrays in, numbers out).

Conventions: I[A, B] is the effect of adding B on A (row = evaluated language);
negative = B hurts A. Diagonal entries and unmeasured (NaN) entries are left out
of every mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def loss_matrix(records: list[dict], languages: tuple[str, ...]) -> np.ndarray:
    """L[A, B] from run records: diagonal from monolingual runs, L[A, B] = loss on A of the A+B model."""
    index = {code: i for i, code in enumerate(languages)}
    loss = np.full((len(languages), len(languages)), np.nan)
    for record in records:
        covered = record["languages"]
        if any(code not in index for code in covered):
            continue  # a run of a language outside the analysed set
        for evaluated in covered:
            partner = covered[0] if len(covered) == 1 else next(c for c in covered if c != evaluated)
            loss[index[evaluated], index[partner]] = record["loss"][evaluated]
    return loss


def iqr_outliers(values: np.ndarray, k: float = 1.5) -> tuple[np.ndarray, tuple[float, float]]:
    """Mask of values outside [Q1 - k IQR, Q3 + k IQR] (NaN is never an outlier), and the bounds."""
    q1, q3 = np.nanpercentile(values, [25, 75])
    low, high = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    with np.errstate(invalid="ignore"):
        return (values < low) | (values > high), (float(low), float(high))


def _off_diagonal_pairs(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the measured off-diagonal entries."""
    rows, cols = np.nonzero(~np.eye(len(matrix), dtype=bool) & ~np.isnan(matrix))
    return rows, cols


def group_means(interference: np.ndarray, labels: list[str], min_size: int = 1) -> tuple[list[str], np.ndarray]:
    """Block means: M[g, h] = mean I[A, B] over A in group g, B in group h, A != B.

    Groups with fewer than `min_size` languages are left out (the paper keeps
    families with at least 3 languages). Empty labels are left out too.
    """
    groups = sorted({label for label in labels if label and labels.count(label) >= min_size})
    members = {g: [i for i, label in enumerate(labels) if label == g] for g in groups}
    block = np.full((len(groups), len(groups)), np.nan)
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    for gi, g in enumerate(groups):
        for hi, h in enumerate(groups):
            mask = np.zeros_like(off_diagonal)
            mask[np.ix_(members[g], members[h])] = True
            values = interference[mask & off_diagonal]
            values = values[~np.isnan(values)]
            if values.size:
                block[gi, hi] = values.mean()
    return groups, block


@dataclass(frozen=True)
class Comparison:
    """Mean of I over pairs inside vs across groups, with a permutation test of the difference."""

    same_mean: float
    different_mean: float
    same_count: int
    different_count: int
    p_value: float  # two-sided, labels permuted across languages

    @property
    def difference(self) -> float:
        return self.same_mean - self.different_mean


def same_vs_different(
    interference: np.ndarray, labels: list[str], permutations: int = 2000, seed: int = 0
) -> Comparison:
    """Do languages sharing a label (script, family) interfere less with each other than others?"""
    rows, cols = _off_diagonal_pairs(interference)
    values = interference[rows, cols]
    labels_array = np.array(labels, dtype=object)
    if values.size == 0:
        return Comparison(float("nan"), float("nan"), 0, 0, float("nan"))

    def split(perm_labels):
        same = perm_labels[rows] == perm_labels[cols]
        return same, values[same].mean() if same.any() else np.nan, values[~same].mean() if (~same).any() else np.nan

    same, same_mean, different_mean = split(labels_array)
    observed = same_mean - different_mean
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(permutations):
        _, s, d = split(rng.permutation(labels_array))
        exceed += abs(s - d) >= abs(observed) - 1e-12
    return Comparison(
        float(same_mean), float(different_mean), int(same.sum()), int((~same).sum()), (exceed + 1) / (permutations + 1)
    )


@dataclass(frozen=True)
class Asymmetry:
    pairs: int  # unordered pairs with both directions measured
    mean_abs_difference: float  # mean |I[A,B] - I[B,A]|
    mean_abs_interference: float  # mean |I| over the same entries, for scale
    correlation: float  # Pearson r between I[A,B] and I[B,A]
    sign_disagreement: float  # share of pairs where one direction helps and the other hurts
    robustness_friendliness_correlation: float  # Pearson r between row and column means


def asymmetry(interference: np.ndarray, robustness: np.ndarray, friendliness: np.ndarray) -> Asymmetry:
    upper = np.triu(np.ones_like(interference, dtype=bool), k=1)
    both = upper & ~np.isnan(interference) & ~np.isnan(interference.T)
    forward, backward = interference[both], interference.T[both]
    finite = ~np.isnan(robustness) & ~np.isnan(friendliness)
    return Asymmetry(
        pairs=int(both.sum()),
        mean_abs_difference=float(np.mean(np.abs(forward - backward))) if forward.size else float("nan"),
        mean_abs_interference=(
            float(np.mean(np.abs(np.concatenate([forward, backward])))) if forward.size else float("nan")
        ),
        correlation=float(np.corrcoef(forward, backward)[0, 1]) if forward.size > 2 else float("nan"),
        sign_disagreement=float(np.mean(np.sign(forward) != np.sign(backward))) if forward.size else float("nan"),
        robustness_friendliness_correlation=float(np.corrcoef(robustness[finite], friendliness[finite])[0, 1])
        if finite.sum() > 2
        else float("nan"),
    )


def mean_by_group(values: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Mean of a per-language quantity (robustness, friendliness) by group label."""
    means = {}
    for group in sorted({label for label in labels if label}):
        members = np.array([v for v, label in zip(values, labels) if label == group], dtype=float)
        means[group] = float(members[~np.isnan(members)].mean()) if (~np.isnan(members)).any() else float("nan")
    return means


def permutation_p_value(values: np.ndarray, labels: list[str], first: str, second: str,
                        permutations: int = 2000, seed: int = 0) -> float:
    """Two-sided p of mean(values | first) - mean(values | second), labels permuted across languages."""
    keep = np.array([label in (first, second) for label in labels]) & ~np.isnan(values)
    kept_values, kept_labels = values[keep], np.array(labels, dtype=object)[keep]
    if (kept_labels == first).sum() == 0 or (kept_labels == second).sum() == 0:
        return float("nan")

    def difference(lab):
        return kept_values[lab == first].mean() - kept_values[lab == second].mean()

    observed = abs(difference(kept_labels))
    rng = np.random.default_rng(seed)
    exceed = sum(abs(difference(rng.permutation(kept_labels))) >= observed - 1e-12 for _ in range(permutations))
    return (exceed + 1) / (permutations + 1)
