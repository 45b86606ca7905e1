"""Per-request language routing: turn a request's `model` and `vllm_xargs` into what the plugin runs.

Languages are models, as vLLM's LoRA adapters are: `BASE:LANG` (e.g. `gemma-3-270m:swh_Latn`)
names the served model BASE steered for LANG with its serving defaults, for every loaded
intervention (`language_model_cards` lists them in /v1/models with parent BASE). The router
rewrites `model` to BASE and sets `vllm_xargs.language`; the request's other `vllm_xargs`
(alpha, layers, positions) still override the defaults. A `vllm_xargs.language` naming
another language than the model name is a 400: neither silently wins. An unknown BASE or
LANG is OpenAI's 404 listing the models that exist.

`language` may be a FLORES-200 / ISO 639-1 / ISO 639-3 code (normalised), `"auto"`
(identify the prompt's language; chat: the user turns), or `"auto-spans"` (identify
each sentence and steer only the token ranges of sentences in the steered
language). Server-only keys are consumed here and never reach the engine:
  on_missing      "error" (default: 400 when no intervention is loaded for an
                  explicit language) or "passthrough" (serve it plain)
  min_confidence  detection threshold for this request (default: the server's)
"""

from dataclasses import dataclass
from http import HTTPStatus

from intervene_engine.request_spec import (
    LANGUAGE_KEY,
    VERSION_KEY,
    RequestSpecError,
    flatten_ranges,
    parse_request_spec,
    position_span,
    resolve,
)
from intervene_server import metrics
from intervene_server.detection import LanguageDetector
from intervene_server.prompt_tokens import PromptError, PromptTokenizer, user_text_parts
from intervene_server.registry import InterventionRegistry
from intervene_server.schemas import AppliedIntervention, InterventionInfo, SpanReport
from lingosteer.languages import UnknownLanguageError, normalize_code

AUTO, AUTO_SPANS = "auto", "auto-spans"
ON_MISSING = ("error", "passthrough")
STEERING_KEYS = (LANGUAGE_KEY, "alpha", "layers", "positions")


class NotLoadedError(LookupError):
    """The request names a language with no loaded intervention: the caller may look for its artifact
    under the root (`InterventionRegistry.load_on_first_use`) and route again."""

    def __init__(self, language: str):
        super().__init__(language)
        self.language = language


class RoutingError(ValueError):
    """The request's language routing arguments are invalid (HTTP 400), or its model does not exist (404)."""

    def __init__(self, message: str, param: str = "vllm_xargs", status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.param = param
        self.status = status


def language_model_name(base: str, language: str) -> str:
    return f"{base}:{language}"


@dataclass
class LanguageRouter:
    registry: InterventionRegistry
    detector: LanguageDetector
    prompt_tokenizer: PromptTokenizer
    auto_language: bool = False  # requests without a language are treated as "auto"
    served_models: tuple[str, ...] = ()  # the BASE names vLLM serves (--served-model-name)

    def language_model_cards(self, base_card: dict) -> list[dict]:
        """/v1/models entries of BASE:LANG for a base model's card (vLLM's `ModelCard`, as JSON), one per
        loaded intervention, with parent BASE as vLLM lists a LoRA adapter."""
        base = base_card["id"]
        return [
            {**base_card, "id": language_model_name(base, language), "parent": base, "owned_by": "lingosteer",
             "lingosteer": {"language": language, "version": info.version,
                            "serving": info.serving.model_dump(mode="json"),
                            "defaults": "calibrated" if info.evidence else "uncalibrated"}}
            for language, info in sorted(self.registry.loaded.items())
        ]

    def route(self, payload: dict, endpoint: str, first_use: bool = False) -> AppliedIntervention:
        """Rewrite `payload["vllm_xargs"]` in place; return what will be applied.

        With `first_use`, a language that names no loaded intervention, and that the registry may find under
        its root, raises `NotLoadedError` instead of the 404, 400 or plain run it would otherwise get.

        Runs in a worker thread while loads may replace `registry.loaded` on the event
        loop, so one request sees one snapshot of it throughout."""
        loaded = self.registry.loaded
        xargs = payload.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            return _plain("vllm_xargs is not an object")  # vLLM itself rejects it
        xargs = dict(xargs or {})
        if VERSION_KEY in xargs:
            # The version is bound by the server when the request arrives; one set by a client would
            # skip that binding (no version in x-lingosteer-applied) and pin an arbitrary version.
            raise RoutingError(f"'{VERSION_KEY}' is set by the server, not by requests; drop it")
        on_missing = xargs.pop("on_missing", "error")
        if on_missing not in ON_MISSING:
            raise RoutingError(f"'on_missing' must be one of {ON_MISSING}, got {on_missing!r}")
        min_confidence = _confidence(xargs.pop("min_confidence", self.detector.min_confidence))
        named = self._model_language(payload, loaded, first_use)
        if named is not None:
            given = xargs.get(LANGUAGE_KEY)
            if given not in (None, "") and _normalized(given) != named:
                raise RoutingError(f"model {payload['model']}:{named} is steered for {named}, but vllm_xargs.language "
                                   f"is {given!r}: name the language once (drop one of them)")
            xargs[LANGUAGE_KEY] = named
        requested = xargs.get(LANGUAGE_KEY)
        if requested is None and self.auto_language:
            requested = AUTO

        if requested in (None, "", "none"):
            applied = _plain("no language requested")
        elif not isinstance(requested, str):
            raise RoutingError(f"'language' must be a string, got {requested!r}")
        elif requested == AUTO:
            applied = self._detect(payload, endpoint, min_confidence, loaded, first_use)
        elif requested == AUTO_SPANS:
            applied = self._detect_spans(payload, endpoint, xargs, min_confidence, loaded)
        else:
            applied = self._explicit(requested, on_missing, loaded, first_use)

        if applied.applied:
            applied = self._serving_defaults(applied, xargs, loaded[applied.language])
        if applied.applied:
            xargs[LANGUAGE_KEY] = applied.language
            self._complete(applied, xargs, loaded[applied.language])
            if isinstance(applied.positions, list):
                xargs["positions"] = flatten_ranges(applied.positions)
        else:
            for key in STEERING_KEYS:
                xargs.pop(key, None)
        if xargs:
            payload["vllm_xargs"] = xargs
        else:
            payload.pop("vllm_xargs", None)
        if endpoint == "completion":
            refuse_context_positions_on_echo(payload, applied)
            self._add_bos(payload, applied)
        return applied

    def _add_bos(self, payload: dict, applied: AppliedIntervention) -> None:
        """Start token-id prompts with the BOS their model's tokenizer adds (`PromptTokenizer.with_bos`)."""
        prompt, added = self.prompt_tokenizer.with_bos(payload.get("prompt"))
        if not added:
            return
        if payload.get("echo") and payload.get("stream"):
            # The echoed prompt would include the added BOS, one place off the prompt the client indexes.
            raise RoutingError("echo with stream=true needs token-id prompts that start with BOS "
                               f"(id {self.prompt_tokenizer.added_bos}), as this model's tokenizer starts text "
                               "prompts: add it, or send stream=false and the server adds it", "prompt")
        payload["prompt"] = prompt
        applied.bos_added = added

    def _model_language(self, payload: dict, loaded: dict[str, InterventionInfo], first_use: bool) -> str | None:
        """The language a `BASE:LANG` model name selects (rewriting `model` to BASE); None for other names,
        which vLLM judges (BASE, a LoRA adapter or its own 404)."""
        model = payload.get("model")
        if not isinstance(model, str) or model in self.served_models or ":" not in model:
            return None
        base, _, code = model.rpartition(":")
        language = _normalized(code) if base in self.served_models else None
        if language is not None and language not in loaded and first_use and self.registry.may_find(language):
            raise NotLoadedError(language)
        if language not in loaded:
            models = [*self.served_models,
                      *(language_model_name(name, code) for name in self.served_models for code in sorted(loaded))]
            raise RoutingError(f"The model `{model}` does not exist; models: {', '.join(models)}", "model",
                               HTTPStatus.NOT_FOUND)
        payload["model"] = base
        return language

    def _explicit(self, requested: str, on_missing: str, loaded: dict[str, InterventionInfo],
                  first_use: bool) -> AppliedIntervention:
        try:
            language = normalize_code(requested)
        except UnknownLanguageError as error:
            raise RoutingError(str(error)) from None
        if language in loaded:
            return AppliedIntervention(applied=True, source="explicit", language=language)
        if first_use and self.registry.may_find(language):
            raise NotLoadedError(language)
        if on_missing == "passthrough":
            return _plain(f"no intervention loaded for {language} (on_missing=passthrough)",
                          source="explicit", language=language)
        listed = ", ".join(sorted(loaded)) or "none"
        raise RoutingError(
            f"no intervention is loaded for {language}; loaded: {listed}. "
            "Set vllm_xargs.on_missing='passthrough' to serve such requests plain."
        )

    def _detect(self, payload, endpoint, min_confidence, loaded, first_use: bool) -> AppliedIntervention:
        text = "\n".join(part.text for part in user_text_parts(payload, endpoint))
        if not text.strip():
            metrics.DETECTIONS.labels(outcome="no_text").inc()
            return _plain("auto: the prompt has no text to identify")
        detection = self.detector.detect(text)
        found = dict(language=detection.language or detection.label, confidence=detection.confidence)
        if detection.confidence < min_confidence:
            metrics.DETECTIONS.labels(outcome="low_confidence").inc()
            return _plain(f"auto: confidence {detection.confidence:.2f} below {min_confidence}", **found)
        missing = detection.language is not None and detection.language not in loaded
        if missing and first_use and self.registry.may_find(detection.language):
            raise NotLoadedError(detection.language)
        if detection.language not in loaded:
            metrics.DETECTIONS.labels(outcome="no_intervention").inc()
            return _plain(f"auto: no intervention loaded for {found['language']}", **found)
        metrics.DETECTIONS.labels(outcome="steered").inc()
        return AppliedIntervention(applied=True, source="detected", **found)

    def _detect_spans(self, payload, endpoint, xargs, min_confidence, loaded) -> AppliedIntervention:
        if "positions" in xargs:
            raise RoutingError("'positions' cannot be combined with language 'auto-spans' (it computes them)")
        parts = user_text_parts(payload, endpoint)
        if endpoint == "completion" and not isinstance(payload.get("prompt"), str):
            raise RoutingError("'auto-spans' needs a single text prompt (token ranges differ per prompt)", "prompt")
        spans = [
            (part, segment)
            for part in parts
            for segment in self.detector.detect_segments(part.text)
        ]
        if not spans:
            metrics.DETECTIONS.labels(outcome="no_text").inc()
            return _plain("auto-spans: the prompt has no text to identify")
        steerable = [
            (part, seg) for part, seg in spans
            if seg.detection.confidence >= min_confidence and seg.detection.language in loaded
        ]
        # One intervention per request: steer the language covering the most characters.
        chars: dict[str, int] = {}
        for _, seg in steerable:
            chars[seg.detection.language] = chars.get(seg.detection.language, 0) + seg.end - seg.start
        language = max(chars, key=chars.get) if chars else None
        try:
            ranges = self.prompt_tokenizer.spans_to_tokens(
                payload, endpoint, [(part, seg.start, seg.end) for part, seg in spans]
            )
        except PromptError as error:
            raise RoutingError(str(error)) from None
        reports = [
            SpanReport(
                message=part.message, start_char=seg.start, end_char=seg.end,
                language=seg.detection.language or seg.detection.label,
                confidence=seg.detection.confidence, tokens=tokens,
                steered=(part, seg) in steerable and seg.detection.language == language and tokens is not None,
            )
            for (part, seg), tokens in zip(spans, ranges)
        ]
        positions = [list(r.tokens) for r in reports if r.steered]
        if not positions:
            metrics.DETECTIONS.labels(outcome="no_intervention").inc()
            return _plain("auto-spans: no segment is in a language with a loaded intervention",
                          source="detected-spans", spans=reports)
        metrics.DETECTIONS.labels(outcome="steered").inc()
        xargs["positions"] = positions
        skipped = sorted(set(chars) - {language})
        return AppliedIntervention(
            applied=True, source="detected-spans", language=language, spans=reports,
            confidence=min(r.confidence for r in reports if r.steered),
            reason=f"one intervention per request: segments in {', '.join(skipped)} not steered" if skipped else None,
        )

    def _serving_defaults(
        self, applied: AppliedIntervention, xargs: dict, info: InterventionInfo
    ) -> AppliedIntervention:
        """Fill what the request left out from the artifact's serving defaults. A calibrated
        alpha of 0 means steering is off for this language unless the request asks for it."""
        serving = info.serving
        if "alpha" not in xargs and serving.alpha == 0:
            summary = info.evidence.summary if info.evidence else "its serving alpha is 0"
            return _plain(f"steering {applied.language} is off by default ({summary}); pass 'alpha' to steer anyway",
                          source=applied.source, language=applied.language, confidence=applied.confidence,
                          spans=applied.spans, defaults="calibrated" if info.evidence else "uncalibrated")
        # Only what the request set travels: the plugin fills the rest from the bound version's
        # serving defaults (`request_spec.resolve`), as it does under plain `vllm serve`.
        applied.defaults = "calibrated" if info.evidence else "uncalibrated"
        return applied

    def _complete(self, applied: AppliedIntervention, xargs: dict, info: InterventionInfo) -> None:
        """Validate the overrides now (400, not a silent plain run) and report their effective values."""
        try:
            spec = parse_request_spec(xargs)
        except RequestSpecError as error:
            raise RoutingError(str(error)) from None
        if spec.layers is not None and not set(spec.layers) <= set(info.layers):
            raise RoutingError(f"'layers' {list(spec.layers)} are not all in the {applied.language} "
                               f"intervention's layers {info.layers}")
        resolved = resolve(spec, info.serving)
        applied.alpha = resolved.alpha
        applied.layers = list(resolved.layers)
        applied.positions = (resolved.positions if isinstance(resolved.positions, str)
                             else [list(r) for r in resolved.positions])


def _plain(reason: str, source: str = "none", **fields) -> AppliedIntervention:
    if fields.get("confidence") is not None and source == "none":
        source = "detected"
    return AppliedIntervention(applied=False, source=source, reason=reason, **fields)


def _normalized(code) -> str | None:
    """The FLORES code of `code`, or None where it is none."""
    try:
        return normalize_code(code) if isinstance(code, str) else None
    except UnknownLanguageError:
        return None


def _confidence(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise RoutingError(f"'min_confidence' must be a number in [0, 1], got {value!r}")
    return float(value)


def refuse_context_positions_on_echo(payload: dict, applied: AppliedIntervention) -> None:
    """Refuse a steered completion that asks for prompt log-probabilities under a position mode whose span
    ends where the prompt ends ("last", "prompt").

    Log-likelihood scoring through this endpoint (lm-eval's local-completions) sends context and
    continuation as one prompt, echoed, and slices the continuation's log-probabilities itself: the
    server cannot tell where the context ends. `lingosteer bench` and the lm-eval backend place these
    modes relative to the context (its last token, its tokens), here they would land on the whole
    prompt ("last": the continuation's last token, which changes no echoed log-probability), so the
    number would silently not be bench's. "all" (every token after BOS) is the same on both paths, and
    explicit token ranges say where they go."""
    echoed = payload.get("echo") and payload.get("logprobs") is not None
    if not applied.applied or applied.alpha == 0 or not (echoed or payload.get("prompt_logprobs") is not None):
        return  # unsteered (alpha 0 too: bench scores it plain), or no prompt log-probabilities asked for
    positions = applied.positions
    if not isinstance(positions, str) or position_span(positions, 1)[1] is None:
        return
    raise RoutingError(
        f"echoed prompt log-probabilities under positions {positions!r} cannot be those of `lingosteer bench`: "
        "an echo prompt holds context and continuation and does not say where the context ends, so "
        f"{positions!r} would steer relative to the whole prompt instead of the context. Send "
        "vllm_xargs.positions='all' (every token after BOS: the same on both paths) or explicit token ranges, "
        "or score with `lingosteer lm-eval` / `lingosteer bench`, which know the split", "echo")
