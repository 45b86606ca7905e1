"""Percentile bootstrap CIs of accuracies and paired deltas: the one resampling scheme of every report
(the benchmark, the interference matrix's downstream check, the code-switching bench).

The resampling unit is the item: items are drawn with replacement within each sample (a language, a
target), so every sample keeps its weight in the mean over samples. With `shared_items` the samples
are rows scored on the same items (languages and seeds on the same test pairs): one draw of item
indices serves every row, so an item's results across rows stay together.

Not `scipy.stats.bootstrap`: with `batch`, the memory bound that files of thousands of items need, it
draws the samples' resamples interleaved batch by batch, where this draws one sample's after the
other; the published CIs come from this order, and scipy's would move them by resampling noise. It
also refuses a sample of one item.
"""

from __future__ import annotations

import numpy as np

RESAMPLED_CELLS = 2_000_000  # values resampled at once: bounded memory for big files


def bootstrap_mean_ci(samples: list[np.ndarray], resamples: int = 10000, seed: int | np.random.Generator = 0,
                      level: float = 0.95, shared_items: bool = False) -> tuple[float, float]:
    """Percentile CI of the mean over samples of each sample's mean (e.g. its accuracy).

    `seed` may be a Generator, whose stream then carries on from call to call (as in a report that
    draws all of its CIs from one).
    """
    rng = np.random.default_rng(seed)
    samples = [np.asarray(values, float) for values in samples]
    if any(values.size == 0 for values in samples):
        raise ValueError("a language with no items has no accuracy")
    tables = [np.stack(samples)] if shared_items else [values[None] for values in samples]  # [rows, items]
    means = np.zeros(resamples)
    for table in tables:
        items = table.shape[1]
        for chunk in np.array_split(np.arange(resamples), max(1, resamples * table.size // RESAMPLED_CELLS)):
            picks = rng.integers(0, items, size=(chunk.size, items))
            means[chunk] += table[:, picks].mean(axis=(0, 2))
    means /= len(tables)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_delta_ci(pairs: list[tuple[np.ndarray, np.ndarray]], resamples: int = 10000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of mean_over_samples(mean(other) - mean(baseline)).

    Each element of `pairs` is one sample's (baseline, other) results over the same items (e.g. a
    language's correctness without and with the intervention); items are resampled with replacement
    within each sample, so the pairing is kept and every sample keeps its weight.
    """
    differences = [np.asarray(other, float) - np.asarray(baseline, float) for baseline, other in pairs]
    return bootstrap_mean_ci(differences, resamples, seed, level)
