"""`/v1/interference*`: the language interference matrix, per-language views, recommendations."""

import math
from pathlib import Path

from fastapi import APIRouter, Query

from intervene_server.path_languages import language_or_404
from intervene_server.schemas import (
    ErrorBody,
    InterferenceData,
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
    ) -> RecommendationList:
        """Source languages to align `target` toward, best first, each with the reason
        (unmeasured pairs are left out)."""

        language = language_in_matrix(target)
        ranked = recommend_sources(matrix, language, k)
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
        )

    return router


def _recommendation(item) -> Recommendation:
    fields = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in vars(item).items()}
    return Recommendation(**fields)
