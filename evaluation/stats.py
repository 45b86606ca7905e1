"""Tests of baseline vs intervened correctness of the same items: exact McNemar, non-inferiority.

The bootstrap CIs live in the shared core (`lingosteer.stats`).
"""

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


def noninferiority_p(baseline: np.ndarray, intervened: np.ndarray, margin: float) -> float:
    """One-sided p of "the intervened run loses more than `margin` accuracy" (Tango's score test, 1998).

    The variance is taken under the null (difference = -margin, restricted maximum likelihood), not
    from the observed items: with a handful of discordant items an observed-variance interval (or a
    percentile bootstrap) is too narrow and rules out harm too often.
    """
    from scipy.stats import norm

    baseline, intervened = np.asarray(baseline, bool), np.asarray(intervened, bool)
    n = baseline.size
    lost, won = int(np.sum(baseline & ~intervened)), int(np.sum(~baseline & intervened))
    delta = -margin
    # P(lost) under the null: the larger root of 2n x^2 - B x - C = 0 (the score equation with won = lost + delta).
    b_coef = lost * (1 - 3 * delta) + won * (1 - delta) - 2 * delta * (n - lost - won)
    c_coef = lost * delta * (1 - delta)
    p_lost = (b_coef + np.sqrt(b_coef**2 + 8 * n * c_coef)) / (4 * n)
    variance = (2 * p_lost + delta - delta**2) / n
    z = ((won - lost) / n - delta) / np.sqrt(max(variance, 1e-12))
    return float(norm.sf(z))
