"""Predict unmeasured entries of an interference matrix from a partial sweep.

Model (fitted on the measured off-diagonal entries by alternating ridge regression):

    I[A, B] ~ mu + r[A] + c[B] + beta_script * same_script(A, B) + beta_family * same_family(A, B) + u[A] . v[B]

r and c capture robustness and friendliness, the side information captures the
script and family effects the paper found, u . v a low-rank remainder.
`evaluate_completion` hides random measured entries, predicts them, and reports
errors next to simple proxies, so users can judge how much of a sweep to skip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _same(labels: list[str]) -> np.ndarray:
    labels = np.array(labels, dtype=object)
    return ((labels[:, None] == labels[None, :]) & (labels[:, None] != "")).astype(float)


def _ridge(x: np.ndarray, y: np.ndarray, reg: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + reg * np.eye(x.shape[1]), x.T @ y)


@dataclass(frozen=True)
class CompletionModel:
    """Fitted parameters; `predict()` gives the full n x n matrix (diagonal 0)."""

    mu: float
    row_effect: np.ndarray
    column_effect: np.ndarray
    beta_script: float
    beta_family: float
    u: np.ndarray
    v: np.ndarray
    same_script: np.ndarray
    same_family: np.ndarray

    def predict(self) -> np.ndarray:
        full = (
            self.mu
            + self.row_effect[:, None]
            + self.column_effect[None, :]
            + self.beta_script * self.same_script
            + self.beta_family * self.same_family
            + self.u @ self.v.T
        )
        np.fill_diagonal(full, 0.0)
        return full


def fit_completion(
    interference: np.ndarray,
    scripts: list[str],
    families: list[str],
    rank: int = 1,
    reg: float = 0.1,
    iterations: int = 50,
    seed: int = 0,
) -> CompletionModel:
    """Fit on the measured (non-NaN) off-diagonal entries of `interference`."""
    n = len(interference)
    rows, cols = np.nonzero(~np.eye(n, dtype=bool) & ~np.isnan(interference))
    if rows.size == 0:
        raise ValueError("no measured off-diagonal entries to fit")
    y = interference[rows, cols]
    same_script, same_family = _same(scripts), _same(families)
    # Design of the linear part: intercept, one-hot row, one-hot column, side information.
    x = np.zeros((rows.size, 1 + 2 * n + 2))
    x[:, 0] = 1.0
    x[np.arange(rows.size), 1 + rows] = 1.0
    x[np.arange(rows.size), 1 + n + cols] = 1.0
    x[:, -2], x[:, -1] = same_script[rows, cols], same_family[rows, cols]
    scale = float(np.std(y)) or 1.0
    rng = np.random.default_rng(seed)
    u = rng.normal(scale=0.1 * scale, size=(n, rank))
    v = rng.normal(scale=0.1 * scale, size=(n, rank))
    for _ in range(iterations):
        theta = _ridge(x, y - np.sum(u[rows] * v[cols], axis=1), reg)
        residual = y - x @ theta
        for a in range(n):
            mine = rows == a
            if mine.any():
                u[a] = _ridge(v[cols[mine]], residual[mine], reg)
        for b in range(n):
            mine = cols == b
            if mine.any():
                v[b] = _ridge(u[rows[mine]], residual[mine], reg)
    return CompletionModel(
        float(theta[0]), theta[1 : 1 + n], theta[1 + n : 1 + 2 * n], float(theta[-2]), float(theta[-1]), u, v,
        same_script, same_family,
    )


def predict_same_script_mean(interference: np.ndarray, scripts: list[str]) -> np.ndarray:
    """Proxy: every pair gets the mean measured I of pairs with the same same-script/different-script status."""
    same = _same(scripts).astype(bool)
    measured = ~np.eye(len(interference), dtype=bool) & ~np.isnan(interference)
    prediction = np.where(same, np.nanmean(interference[measured & same]) if (measured & same).any() else np.nan,
                          np.nanmean(interference[measured & ~same]) if (measured & ~same).any() else np.nan)
    fallback = np.nanmean(interference[measured])
    prediction = np.where(np.isnan(prediction), fallback, prediction)
    np.fill_diagonal(prediction, 0.0)
    return prediction


def cosine_similarity_matrix(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return unit @ unit.T


def predict_from_similarity(interference: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """Proxy: a straight line I ~ a + b * cosine(A, B), fitted on the measured entries."""
    measured = ~np.eye(len(interference), dtype=bool) & ~np.isnan(interference)
    slope, intercept = np.polyfit(similarity[measured], interference[measured], deg=1)
    prediction = intercept + slope * similarity
    np.fill_diagonal(prediction, 0.0)
    return prediction


@dataclass(frozen=True)
class CompletionScore:
    method: str
    mae: float
    rmse: float
    correlation: float  # Pearson r between predicted and measured held-out entries


def evaluate_completion(
    interference: np.ndarray,
    scripts: list[str],
    families: list[str],
    similarity: np.ndarray | None = None,
    holdout_fraction: float = 0.3,
    repeats: int = 20,
    rank: int = 1,
    seed: int = 0,
) -> list[CompletionScore]:
    """Hide `holdout_fraction` of the measured pairs (both directions of an unordered pair
    together, as a skipped run hides both), predict them, and score each method."""
    n = len(interference)
    measured = ~np.isnan(interference)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n) if measured[a, b] and measured[b, a]]
    if len(pairs) < 4:
        raise ValueError(f"only {len(pairs)} measured pairs: too few to evaluate completion")
    rng = np.random.default_rng(seed)
    predictions: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for _ in range(repeats):
        chosen = rng.choice(len(pairs), size=max(1, round(holdout_fraction * len(pairs))), replace=False)
        hidden = np.zeros((n, n), dtype=bool)
        for k in chosen:
            a, b = pairs[k]
            hidden[a, b] = hidden[b, a] = True
        train = np.where(hidden, np.nan, interference)
        measured_train = ~np.eye(n, dtype=bool) & ~np.isnan(train)
        methods = {
            "completion (low rank + script/family)": fit_completion(train, scripts, families, rank=rank).predict(),
            "same-script mean": predict_same_script_mean(train, scripts),
            "global mean": np.full((n, n), np.nanmean(train[measured_train])),
        }
        if similarity is not None:
            methods["embedding cosine (linear)"] = predict_from_similarity(train, similarity)
        for name, predicted in methods.items():
            predictions.setdefault(name, []).append((predicted[hidden], interference[hidden]))
    scores = []
    for name, parts in predictions.items():
        predicted = np.concatenate([p for p, _ in parts])
        truth = np.concatenate([t for _, t in parts])
        error = predicted - truth
        correlation = float(np.corrcoef(predicted, truth)[0, 1]) if np.std(predicted) > 0 else float("nan")
        mae, rmse = float(np.mean(np.abs(error))), float(np.sqrt(np.mean(error**2)))
        scores.append(CompletionScore(name, mae, rmse, correlation))
    return scores
