"""Paired statistics for baseline vs intervened correctness of the same items."""

from __future__ import annotations

import numpy as np


def mcnemar_exact(baseline: np.ndarray, intervened: np.ndarray) -> dict:
    """Exact McNemar test: a two-sided binomial test on the discordant pairs.

    `b` items only the baseline got right, `c` only the intervened run; under the null
    each discordant item is a fair coin. p = 1 when there is no discordant item.
    """
    from scipy.stats import binomtest

    baseline, intervened = np.asarray(baseline, bool), np.asarray(intervened, bool)
    b = int(np.sum(baseline & ~intervened))
    c = int(np.sum(~baseline & intervened))
    p = 1.0 if b + c == 0 else float(binomtest(c, b + c, 0.5).pvalue)
    return {"baseline_only": b, "intervened_only": c, "p": p}


def bootstrap_delta_ci(pairs: list[tuple[np.ndarray, np.ndarray]], resamples: int = 10000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of mean_over_languages(acc_intervened - acc_baseline).

    Each element of `pairs` is one language's (baseline, intervened) correctness over
    the same items; items are resampled with replacement within each language, so
    the pairing is kept and every language keeps its weight.
    """
    differences = [np.asarray(intervened, float) - np.asarray(baseline, float) for baseline, intervened in pairs]
    return bootstrap_mean_ci(differences, resamples, seed, level)


def bootstrap_mean_ci(samples: list[np.ndarray], resamples: int = 10000,
                      seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean over languages of each language's mean (e.g. its accuracy).

    Values are resampled with replacement within each language, so every language keeps its weight.
    """
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for values in samples:
        values = np.asarray(values, float)
        if values.size == 0:
            raise ValueError("a language with no items has no accuracy")
        for chunk in np.array_split(np.arange(resamples), max(1, resamples * values.size // 2_000_000)):
            picks = rng.integers(0, values.size, size=(chunk.size, values.size))  # bounded memory for big files
            means[chunk] += values[picks].mean(axis=1)
    means /= len(samples)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
