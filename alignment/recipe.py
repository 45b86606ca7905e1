"""The recommended alignment recipe: what `lingosteer align fit` does without solver or data options.

Chosen by out-of-domain retrieval over 8 languages in 4 scripts on Gemma 3 270M
(`bench/alignment_recipes.py`; the table, the selection rule and the reasoning are
in docs/alignment.md). Change it only with a new comparison.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    solver: str
    pooling: str
    data: tuple[str, ...]  # parallel-source specs (see lingosteer.data.parse_parallel_source)


RECOMMENDED = Recipe(solver="ridge", pooling="mean", data=("sib200:train,dev", "ntrex:0-299"))
