"""The interference artifact: `interference.json`, written by `sweep analyse`, loaded by the server.

    {"format": "lingosteer.interference", "format_version": 2,
     "languages": [FLORES codes],
     "loss": [[L[A][B]]],          # row = evaluated language A, column = added language B,
                                   # diagonal = A's monolingual loss; null = not measured
     "interference": [[I[A][B]]],  # measured: (L[A][A] - L[A][B]) / L[A][A], diagonal 0;
                                   # completed (a partial design): predicted; null = neither
     "measured": [[bool]],         # True where I comes from measured losses
     "completion": {...},          # how unmeasured entries were predicted and their expected error
     "robustness": {code: mean of row}, "friendliness": {code: mean of column},
     "metadata": {...}}

Format 1 (every file before partial designs) has no `measured` and no `completion`: every
non-null entry is measured. It still loads. `load_interference` checks all of it (the
pydantic model `InterferenceDocument`) and recomputes I from L, so a file edited by hand
cannot silently disagree with itself.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lingosteer.validation import first_problem
from matrix.jsonio import json_safe, write_json_atomic

FORMAT = "lingosteer.interference"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def interference_from_loss(loss: np.ndarray) -> np.ndarray:
    """I[A,B] = (L[A,A] - L[A,B]) / L[A,A]; diagonal 0; NaN where L is unmeasured."""
    loss = np.asarray(loss, dtype=float)
    mono = np.diag(loss)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        interference = (mono - loss) / mono
    np.fill_diagonal(interference, 0.0)
    interference[np.isnan(mono[:, 0]), :] = np.nan  # no monolingual run: the whole row is unknown
    return interference


def off_diagonal_mean(matrix: np.ndarray, axis: int) -> np.ndarray:
    """Mean over a row (axis=1) or column (axis=0), leaving out the diagonal and unmeasured entries."""
    values = np.array(matrix, dtype=float)
    np.fill_diagonal(values, np.nan)
    counts = np.sum(~np.isnan(values), axis=axis)
    sums = np.nansum(values, axis=axis)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@dataclass(frozen=True)
class InterferenceMatrix:
    languages: tuple[str, ...]
    loss: np.ndarray
    interference: np.ndarray
    metadata: dict = field(default_factory=dict)
    measured: np.ndarray | None = None  # bool, True where I comes from measured losses; None: wherever I is known
    completion: dict = field(default_factory=dict)  # method and expected error of the completed entries

    def __post_init__(self) -> None:
        if self.measured is None:
            object.__setattr__(self, "measured", ~np.isnan(self.interference))

    @classmethod
    def from_loss(cls, languages, loss, metadata=None) -> "InterferenceMatrix":
        loss = np.asarray(loss, dtype=float)
        return cls(tuple(languages), loss, interference_from_loss(loss), dict(metadata or {}))

    def completed(self, predicted: np.ndarray, completion: dict) -> "InterferenceMatrix":
        """This matrix with its unmeasured entries taken from `predicted`; measured ones are kept."""
        filled = np.where(self.measured, self.interference, predicted)
        np.fill_diagonal(filled, 0.0)
        return InterferenceMatrix(self.languages, self.loss, filled, self.metadata, self.measured, dict(completion))

    @property
    def robustness(self) -> np.ndarray:
        """How little a language suffers from others: mean of its row (off-diagonal, measured and completed)."""
        return off_diagonal_mean(self.interference, axis=1)

    @property
    def friendliness(self) -> np.ndarray:
        """How little a language hurts others: mean of its column (off-diagonal, measured and completed)."""
        return off_diagonal_mean(self.interference, axis=0)

    def measured_only(self) -> np.ndarray:
        """I with completed entries as NaN: what the runs measured."""
        return np.where(self.measured, self.interference, np.nan)

    def index(self, code: str) -> int:
        if code in self.languages:
            return self.languages.index(code)
        close = difflib.get_close_matches(code, self.languages, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"language {code!r} is not in the interference matrix ({', '.join(self.languages)}){hint}")

    def to_json_dict(self) -> dict:
        return json_safe(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "languages": list(self.languages),
                "loss": self.loss.tolist(),
                "interference": self.interference.tolist(),
                "robustness": dict(zip(self.languages, self.robustness.tolist())),
                "friendliness": dict(zip(self.languages, self.friendliness.tolist())),
                "measured": self.measured.tolist(),
                "completion": self.completion,
                "metadata": self.metadata,
            }
        )


def save_interference(matrix: InterferenceMatrix, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, matrix.to_json_dict())
    return path


# A measured value, or null where it was not measured.
Cell = Annotated[float | None, Field(allow_inf_nan=False)]


class InterferenceDocument(BaseModel):
    """interference.json as `load_interference` accepts it; robustness and friendliness are
    recomputed from the matrix, so they are not read."""

    model_config = ConfigDict(strict=True, extra="allow")

    format_version: Literal[READABLE_VERSIONS]
    languages: Annotated[list[str], Field(min_length=1)]
    loss: list[list[Cell]]
    interference: list[list[Cell]]
    measured: list[list[bool]] | None = None  # format 2 only
    completion: dict[str, Any] = {}
    metadata: dict[str, Any] = {}

    def square(self, key: str) -> np.ndarray:
        """`loss` or `interference` as a float array, NaN where null."""
        return np.array(getattr(self, key), dtype=float)

    @model_validator(mode="after")
    def _consistent(self) -> InterferenceDocument:
        n = len(self.languages)
        if len(set(self.languages)) != n:
            raise ValueError("`languages` has duplicates")
        if (self.format_version >= 2) != (self.measured is not None):
            raise ValueError("`measured` is required from format_version 2 on, and unknown before")
        for key in ("loss", "interference", "measured"):
            value = getattr(self, key)
            if value is not None and (len(value) != n or any(len(row) != n for row in value)):
                raise ValueError(f"`{key}` must be a {n} x {n} list of lists (one row and column per language)")
        loss, interference = self.square("loss"), self.square("interference")
        if (loss[~np.isnan(loss)] <= 0).any():
            raise ValueError("losses must be positive")
        if not np.allclose(np.diag(interference)[~np.isnan(np.diag(interference))], 0.0):
            raise ValueError("the diagonal of `interference` must be 0")
        expected = interference_from_loss(loss)
        measured = ~np.isnan(expected)
        # Format 1 has no completed entries: I is known exactly where the losses give it.
        known = np.array(self.measured, dtype=bool) if self.measured is not None else ~np.isnan(interference)
        if not np.array_equal(measured, known):
            raise ValueError("`measured` must be true exactly where `loss` gives I (both losses measured)")
        if np.isnan(interference[measured]).any() or not np.allclose(
            expected[measured], interference[measured], rtol=1e-6, atol=1e-9
        ):
            raise ValueError("`interference` does not equal (L[A][A] - L[A][B]) / L[A][A] computed from `loss`")
        return self


def load_interference(path: str | Path) -> InterferenceMatrix:
    """Read and validate an `interference.json`; every problem is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interference file {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    try:
        document = InterferenceDocument.model_validate(data)
    except ValidationError as invalid:
        raise ValueError(f"{path}: {first_problem(invalid).message}") from None
    languages = tuple(document.languages)
    return InterferenceMatrix(languages, document.square("loss"), document.square("interference"), document.metadata,
                              ~np.isnan(interference_from_loss(document.square("loss"))), document.completion)
