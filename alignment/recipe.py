"""Fitting recipes: what `lingosteer align fit` does without solver or data options, and INCLINE's own.

RECOMMENDED was chosen by out-of-domain retrieval over 8 languages in 4 scripts on
Gemma 3 270M (`bench/alignment_recipes.py`; the table, the selection rule and the
reasoning are in docs/alignment.md). Change it only with a new comparison. The second
comparison's retrieval pick, the ridge on z-scores (`standardise`), did not pass the
downstream check on XCOPA, so RECOMMENDED stays the raw ridge.

INCLINE is the released code's fit (methods.md, section 1): min-norm lstsq without bias on
mean-pooled states of the first 500 parallel lines, every odd line code-switched, stored in
INCLINE's additive form so that alpha is their strength s. `bench --incline` scores it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    solver: str
    pooling: str
    data: tuple[str, ...]  # parallel-source specs (see lingosteer.data.parse_parallel_source)
    bias: bool | None = None  # None: the solver's own default
    rank: int | None = None
    standardise: bool = False  # ridge on per-dimension z-scores (alignment.estimator)
    form: str = "map"
    max_pairs: int | None = None
    code_switch: bool = False  # lingosteer.data.code_switched


RECOMMENDED = Recipe(solver="ridge", pooling="mean", data=("sib200:train,dev", "ntrex:0-299"))
# Their corpus (news commentary) is not at hand; SIB-200/FLORES has every XCOPA language.
INCLINE = Recipe(solver="lstsq", pooling="mean", data=("sib200:train",), bias=False, form="incline",
                 max_pairs=500, code_switch=True)
RECIPES = {"recommended": RECOMMENDED, "incline": INCLINE}
