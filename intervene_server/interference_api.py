"""`/v1/interference*`: the language interference matrix, per-language views, recommendations."""

import math
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query

from intervene_server.path_languages import language_or_404
from intervene_server.schemas import (
    ErrorBody,
    InterferenceData,
    InterferenceEntry,
    LanguageInterference,
    Recommendation,
    RecommendationList,
)
from matrix.artifact import load_interference
from matrix.recommend import recommend_sources


def read_interference(path: Path):

    return load_interference(path)


def interference_router(matrix) -> APIRouter:
    document = InterferenceData(**matrix.to_json_dict())
    router = APIRouter(prefix="/v1/interference", tags=["lingosteer"], responses={404: {"model": ErrorBody}})

    def language_in_matrix(code: str) -> str:
        return language_or_404(code, document.languages, "languages of the interference matrix")

    @router.get("", response_model=InterferenceData)
    async def whole_matrix() -> InterferenceData:
        """Languages, loss and interference matrices, per-language scores and metadata."""
        return document

    # Declared before /{language} so that "recommend" is not taken for a language code.
    @router.get("/recommend", response_model=RecommendationList)
    async def recommend(
        target: str = Query(description="language to steer (FLORES-200 or ISO 639 code)"),
        k: int = Query(3, ge=1, le=50, description="how many source languages"),
        measured_only: bool = Query(False, description="leave out pairs whose entries were completed"),
    ) -> RecommendationList:
        """Source languages to align `target` toward, best first, each with the reason and whether it
        rests on measured or completed entries (pairs neither measured nor completed are left out)."""

        language = language_in_matrix(target)
        ranked = recommend_sources(matrix, language, k, measured_only=measured_only)
        return RecommendationList(target=language, recommendations=[_recommendation(r) for r in ranked])

    @router.get("/{language}", response_model=LanguageInterference)
    async def one_language(language: str) -> LanguageInterference:
        """A language's robustness and friendliness, and its row and column of the matrix."""
        code = language_in_matrix(language)
        i = document.languages.index(code)
        return LanguageInterference(
            language=code,
            robustness=document.robustness[code],
            friendliness=document.friendliness[code],
            row=dict(zip(document.languages, document.interference[i])),
            column={a: document.interference[j][i] for j, a in enumerate(document.languages)},
            row_measured=dict(zip(document.languages, document.measured[i])),
            column_measured={a: document.measured[j][i] for j, a in enumerate(document.languages)},
            completed_expected_error=document.completion.get("expected_abs_error"),
        )

    @router.get("/{language}/{partner}", response_model=InterferenceEntry)
    async def one_entry(
        language: str,
        partner: str,
        measured: bool = Query(False, description="only a measured entry: a completed one answers 404"),
    ) -> InterferenceEntry:
        """I[language][partner]: the effect on `language` of adding `partner`, measured or completed."""
        a, b = language_in_matrix(language), language_in_matrix(partner)
        i, j = document.languages.index(a), document.languages.index(b)
        was_measured, error = document.measured[i][j], document.completion.get("expected_abs_error")
        if measured and not was_measured:
            raise HTTPException(404, f"I[{a}][{b}] is completed (predicted by the matrix completion, expected "
                                     f"error {error if error is None else round(error, 4)}), not measured")
        return InterferenceEntry(
            evaluated=a, added=b, interference=document.interference[i][j], loss=document.loss[i][j],
            measured=was_measured, expected_error=None if was_measured else error,
        )

    return router


def _recommendation(item) -> Recommendation:
    fields = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in vars(item).items()}
    return Recommendation(**fields)
