"""Pydantic models of every body our routes take or return (they make the OpenAPI schema)."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from alignment.artifact import ServingDefaults  # the manifest's model: one owner of what serving defaults are

# [start, end) prompt token ranges, as lists: the form the JSON carries and the router fills in.
Positions = str | list[Annotated[list[int], Field(min_length=2, max_length=2)]]


class SpanReport(BaseModel):
    """One segment of an `auto-spans` prompt and whether its tokens were steered."""

    message: int | None = Field(None, description="index of the chat message (None for completions)")
    start_char: int
    end_char: int
    language: str | None
    confidence: float
    tokens: tuple[int, int] | None = Field(None, description="[start, end) prompt token range")
    steered: bool


class AppliedIntervention(BaseModel):
    """What the server did to one request; sent as the `x-lingosteer-applied` header
    (compact JSON) and as the `lingosteer` field of the response body."""

    applied: bool
    source: Literal["explicit", "detected", "detected-spans", "none"]
    language: str | None = None
    confidence: float | None = None
    version: str | None = Field(None, description="intervention version bound when the request started")
    alpha: float | None = None
    layers: list[int] | None = None
    positions: Positions | None = None
    spans: list[SpanReport] | None = None
    defaults: Literal["calibrated", "uncalibrated"] | None = Field(
        None, description="where the values the request left out came from: the artifact's calibrated serving "
                          "defaults, or an artifact without calibration evidence")
    reason: str | None = Field(None, description="why nothing (or only part) was applied")


class InterventionInfo(BaseModel):
    language: str = Field(description="FLORES-200 code of the prompt language it serves")
    target: str
    version: str = Field(description="content hash of the artifact files")
    path: str = Field(description="artifact directory, relative to the interventions root when inside it")
    layers: list[int]
    default_alpha: float
    serving: ServingDefaults = Field(description="what a request naming only its language gets")
    evidence: dict | None = Field(None, description="how the serving defaults were chosen (null: not calibrated)")
    memory_bytes: int


class InterventionList(BaseModel):
    interventions: list[InterventionInfo]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1, max_length=4096,
        description="artifact directory inside the server's interventions root (relative or absolute)",
    )


class LoadResult(BaseModel):
    loaded: InterventionInfo
    replaced_version: str | None = Field(None, description="the version it replaced, if any")


class UnloadResult(BaseModel):
    language: str
    version: str


class LanguageInterference(BaseModel):
    language: str
    robustness: float | None = Field(description="mean of its row, off-diagonal: how little it suffers from others")
    friendliness: float | None = Field(description="mean of its column, off-diagonal: how little it hurts others")
    row: dict[str, float | None] = Field(
        description="I[language][B]: relative loss change of this language when B is added")
    column: dict[str, float | None] = Field(
        description="I[A][language]: relative loss change of A when this language is added")


class InterferenceData(BaseModel):
    languages: list[str]
    loss: list[list[float | None]] = Field(description="L[A][B]; row = evaluated, column = added; null = not measured")
    interference: list[list[float | None]] = Field(description="I[A][B] = (L[A][A] - L[A][B]) / L[A][A]")
    robustness: dict[str, float | None]
    friendliness: dict[str, float | None]
    metadata: dict


class Recommendation(BaseModel):
    language: str = Field(description="the source language to align toward")
    rank: int
    score: float = Field(description="mean of the two directions; higher = less interference")
    target_from_source: float = Field(description="I[target][source]: effect of the source on the target")
    source_from_target: float = Field(description="I[source][target]: effect of the target on the source")
    source_robustness: float | None = Field(description="mean of the source's row")
    reason: str


class RecommendationList(BaseModel):
    target: str
    recommendations: list[Recommendation]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    """vLLM's (OpenAI's) error shape, which vLLM's exception handler gives every HTTP error."""

    error: ErrorInfo
