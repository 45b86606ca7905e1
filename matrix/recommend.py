"""Which source language to align a target toward, judged by interference (pure, no I/O).

An intervention moves the target's representations toward a source language's.
A good source is one the target coexists with: adding the source to training
hurts the target little (I[target, source] near 0 or positive), the target hurts
the source little (I[source, target]), and the source is robust in general (its
row mean). The score is the mean of the two directions; robustness breaks ties
and is reported. Each recommendation says whether both directions were measured or
at least one was completed (predicted by a partial sweep's completion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from matrix.artifact import InterferenceMatrix


@dataclass(frozen=True)
class SourceRecommendation:
    language: str
    rank: int
    score: float  # mean of the two directions below; higher = less interference
    target_from_source: float  # I[target, source]: effect of the source on the target
    source_from_target: float  # I[source, target]: effect of the target on the source
    source_robustness: float  # mean of the source's row
    reason: str
    basis: Literal["measured", "completed"] = "measured"  # "completed": a direction was predicted, not measured


def _describe(value: float) -> str:
    if value >= 0:
        return f"helps ({value:+.4f})"
    return f"hurts ({value:+.4f})"


def recommend_sources(
    matrix: InterferenceMatrix, target: str, k: int = 3, candidates: list[str] | None = None,
    measured_only: bool = False,
) -> list[SourceRecommendation]:
    """The k best source languages for `target`, best first; pairs neither measured nor completed are left
    out, and so are completed ones with `measured_only`."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    t = matrix.index(target)
    pool = list(candidates) if candidates is not None else [c for c in matrix.languages if c != target]
    if target in pool:
        raise ValueError(f"the target {target} cannot be its own source")
    robustness = matrix.robustness
    scored = []
    for code in pool:
        s = matrix.index(code)
        forward, backward = float(matrix.interference[t, s]), float(matrix.interference[s, t])
        if math.isnan(forward) or math.isnan(backward):
            continue
        measured = bool(matrix.measured[t, s] and matrix.measured[s, t])
        if measured_only and not measured:
            continue
        scored.append((0.5 * (forward + backward), float(robustness[s]), code, forward, backward, measured))
    scored.sort(key=lambda item: (-item[0], -(item[1] if not math.isnan(item[1]) else -math.inf), item[2]))
    error = matrix.completion.get("expected_abs_error")
    completed_note = "; completed (predicted, not measured" + (
        f", expected error {error:.4f})" if error is not None else ")")
    return [
        SourceRecommendation(
            language=code,
            rank=rank,
            score=score,
            target_from_source=forward,
            source_from_target=backward,
            source_robustness=robust,
            reason=(
                f"training with {code} {_describe(forward)} {target}'s loss and {target} {_describe(backward)} "
                f"{code}'s; {code}'s mean interference from all languages is {robust:+.4f}"
                + ("; measured" if measured else completed_note)
            ),
            basis="measured" if measured else "completed",
        )
        for rank, (score, robust, code, forward, backward, measured) in enumerate(scored[:k], start=1)
    ]
