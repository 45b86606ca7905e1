"""Pydantic models of every body our routes take or return (they make the OpenAPI schema)."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# The manifest's models: one owner of what serving defaults and their evidence are.
from alignment.artifact import Evidence, ServingDefaults

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
    bos_added: list[int] | None = Field(
        None, description="indices of the token-id prompts the server started with BOS, as the model's tokenizer "
                          "starts every text prompt; echoed log-probabilities leave that token out, so that they "
                          "index the prompt as sent")


class InterventionInfo(BaseModel):
    language: str = Field(description="FLORES-200 code of the prompt language it serves")
    target: str
    version: str = Field(description="content hash of the artifact files")
    path: str = Field(description="artifact directory, relative to the interventions root when inside it")
    layers: list[int]
    serving: ServingDefaults = Field(description="what a request naming only its language gets (its alpha also "
                                                 "what a request naming layers but no alpha gets)")
    evidence: Evidence | None = Field(None, description="how the serving defaults were chosen (null: not calibrated)")
    memory_bytes: int = Field(description="bytes of its map as stored (form, engine dtype) when held on the host")
    form: Literal["full", "lowrank", "shift"] = Field("full", description="the map's parametrization, served as is")
    pinned: bool = Field(False, description="kept in a device slot (never evicted)")


class InterventionList(BaseModel):
    interventions: list[InterventionInfo]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1, max_length=4096,
        description="artifact directory inside the server's interventions root (relative or absolute)",
    )
    pin: bool = Field(False, description="keep this language in a device slot (at most --max-languages - 1 pins)")


class LoadResult(BaseModel):
    loaded: InterventionInfo
    replaced_version: str | None = Field(None, description="the version it replaced, if any")


class HistoryEntry(BaseModel):
    """One load of a language: which version, from where, by whom, when."""

    version: str
    path: str
    loaded_by: str = Field(description="'startup', 'first use', or the admin caller's address")
    at: str = Field(description="ISO 8601 UTC time of the load")
    source: Literal["startup", "path", "upload", "rollback", "first-use"]


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
    row_measured: dict[str, bool] = Field(description="per entry of `row`: measured (true) or completed (false)")
    column_measured: dict[str, bool] = Field(description="per entry of `column`: measured (true) or completed (false)")
    completed_expected_error: float | None = Field(
        None, description="expected absolute error of a completed entry (null: the matrix has none)")


class InterferenceEntry(BaseModel):
    evaluated: str = Field(description="A, the language whose loss is measured")
    added: str = Field(description="B, the language added to A's training data")
    interference: float | None = Field(description="I[A][B]; null = neither measured nor completed")
    loss: float | None = Field(description="L[A][B] (null unless measured)")
    measured: bool = Field(description="false: I[A][B] was completed (predicted), not measured")
    expected_error: float | None = Field(None, description="expected absolute error if completed")


class InterferenceData(BaseModel):
    languages: list[str]
    loss: list[list[float | None]] = Field(description="L[A][B]; row = evaluated, column = added; null = not measured")
    interference: list[list[float | None]] = Field(description="I[A][B] = (L[A][A] - L[A][B]) / L[A][A]")
    robustness: dict[str, float | None]
    friendliness: dict[str, float | None]
    measured: list[list[bool]] = Field(description="true where I[A][B] was measured, false where completed")
    completion: dict = Field(description="how completed entries were predicted and their expected error")
    metadata: dict


class Recommendation(BaseModel):
    language: str = Field(description="the source language to align toward")
    rank: int
    score: float = Field(description="mean of the two directions; higher = less interference")
    target_from_source: float = Field(description="I[target][source]: effect of the source on the target")
    source_from_target: float = Field(description="I[source][target]: effect of the target on the source")
    source_robustness: float | None = Field(description="mean of the source's row")
    reason: str
    basis: Literal["measured", "completed"] = Field(
        description="measured: both directions measured; completed: at least one predicted by the completion")


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
