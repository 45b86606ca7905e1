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

from alignment.estimator import LinearAligner


@dataclass(frozen=True)
class Recipe:
    """What a fit is: the estimator, the states it sees and the data (`alignment.fitting.fit_artifact` runs it)."""

    solver: str
    pooling: str
    data: tuple[str, ...]  # parallel-source specs (see lingosteer.data.parse_parallel_source)
    bias: bool | None = None  # None: the solver's own default
    rank: int | None = None
    standardise: bool = False  # ridge on per-dimension z-scores (alignment.estimator)
    form: str = "map"
    max_pairs: int | None = None
    code_switch: bool = False  # lingosteer.data.code_switched
    layers: tuple[int, ...] | None = None  # None: every layer of the model
    holdout_fraction: float = 0.2  # pairs held out to choose lambda

    def aligner(self) -> LinearAligner:
        """The unfitted estimator; settings that do not apply to the solver fail here, before any state is read."""
        return LinearAligner(solver=self.solver, bias=self.bias, rank=self.rank, standardise=self.standardise,
                             holdout_fraction=self.holdout_fraction)


RECOMMENDED = Recipe(solver="ridge", pooling="mean", data=("sib200:train,dev", "ntrex:0-299"))
# Their corpus (news commentary) is not at hand; SIB-200/FLORES has every XCOPA language.
INCLINE = Recipe(solver="lstsq", pooling="mean", data=("sib200:train",), bias=False, form="incline",
                 max_pairs=500, code_switch=True)
RECIPES = {"recommended": RECOMMENDED, "incline": INCLINE}
