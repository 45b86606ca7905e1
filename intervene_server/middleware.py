"""ASGI middleware around vLLM's completion and chat routes: route, then annotate.

Before vLLM sees a request, the router rewrites its `vllm_xargs` (or answers 400
in OpenAI's error format). On the way out every response gets the header
`x-lingosteer-applied` (compact JSON of `AppliedIntervention`); a JSON body gets a
top-level `lingosteer` field next to `usage`; an event stream gets one extra
chunk before `data: [DONE]` with `"choices": []` and the `lingosteer` field (the
same shape as OpenAI's usage chunk). Headers are held back until the first body
bytes, by which time the request has been sent to the engine and its
intervention version is known.

The request body is read up to a limit (413 beyond it, without reading the rest),
and the CPU work on it (JSON, language identification, tokenization) runs in a
worker thread, so a long prompt never stalls the event loop that streams every
other response.
"""

import json
import logging
from http import HTTPStatus

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders

from intervene_server import metrics
from intervene_server.registry import current_applied
from intervene_server.routing import LanguageRouter, NotLoadedError, RoutingError
from intervene_server.schemas import AppliedIntervention

logger = logging.getLogger("lingosteer.server")

HEADER = "x-lingosteer-applied"
BODY_FIELD = "lingosteer"
ROUTED_PATHS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
_DONE = b"data: [DONE]"
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
MODELS_PATH = "/v1/models"
_ERROR_TYPES = {HTTPStatus.BAD_REQUEST: "BadRequestError", HTTPStatus.NOT_FOUND: "NotFoundError"}


class LanguageRoutingMiddleware:
    def __init__(self, app, router: LanguageRouter, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app = app
        self.router = router
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") == MODELS_PATH and scope["method"] == "GET":
            return await self.app(scope, receive, _ModelListSend(send, self.router))
        endpoint = ROUTED_PATHS.get(scope.get("path")) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body = await _read_body(scope, receive, self.max_request_bytes)
        if body is None:
            return await _send_openai_error(
                send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body larger than the limit of {self.max_request_bytes} bytes "
                "(the server's --max-request-mb)", param=None,
            )
        try:
            try:
                routed = await run_in_threadpool(self._route, body, endpoint, True)
            except NotLoadedError as missing:
                # Look under the root for an artifact added after start; then route as usual (the
                # usual 404, 400 or plain run where there was none).
                found = await self.router.registry.load_on_first_use(missing.language)
                routed = await run_in_threadpool(self._route, body, endpoint, found)
        except RoutingError as error:
            metrics.ROUTING_ERRORS.labels(endpoint=endpoint).inc()
            return await _send_openai_error(send, error.status, str(error), error.param)
        if routed is None:  # not a JSON object, not ours to judge: vLLM answers with its own error
            return await self.app(scope, _replay(body, receive), send)
        body, applied, echoed_bos = routed
        scope = {**scope, "headers": _with_content_length(scope["headers"], len(body))}
        token = current_applied.set(applied)
        try:
            await self.app(scope, _replay(body, receive), _AnnotatingSend(send, applied, echoed_bos))
        finally:
            current_applied.reset(token)
            metrics.count_request(endpoint, applied)

    def _route(self, body: bytes, endpoint: str,
               first_use: bool) -> tuple[bytes, AppliedIntervention, frozenset[int]] | None:
        """The rewritten body, what it will get and the choices whose echoed prompt starts with a BOS the
        server added; None if the body is not a JSON object. `first_use`: see `LanguageRouter.route`."""
        try:
            payload = json.loads(body)
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        applied = self.router.route(payload, endpoint, first_use)
        n = payload.get("n") if isinstance(payload.get("n"), int) else 1
        # vLLM numbers the choices of prompt i i * n, ..., i * n + n - 1.
        echoed_bos = frozenset(i * n + j for i in applied.bos_added or [] for j in range(n)) \
            if payload.get("echo") else frozenset()
        return json.dumps(payload).encode(), applied, echoed_bos  # ASCII escapes: lossless even for lone surrogates


class _HeldStartSend:
    """An ASGI `send` that holds the response's start message back until its body has been seen
    (a rewritten body changes the headers); other messages pass through."""

    def __init__(self, send):
        self.send = send
        self.start = None  # the held-back http.response.start message

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body":
            return await self.send(message)
        return await self.body(message)

    async def body(self, message) -> None:
        raise NotImplementedError


class _AnnotatingSend(_HeldStartSend):
    def __init__(self, send, applied: AppliedIntervention, echoed_bos: frozenset[int] = frozenset()):
        super().__init__(send)
        self.applied = applied
        self.echoed_bos = echoed_bos  # choices whose echoed logprobs start with an added BOS, dropped here
        self.mode = None  # "json" | "stream" | "other", decided at the first body message
        self.json_parts: list[bytes] = []
        self.stream_fields: dict | None = None  # id/object/created/model of the first chunk

    async def body(self, message) -> None:
        if self.mode is None:
            content_type = MutableHeaders(raw=self.start["headers"]).get("content-type", "")
            self.mode = (
                "stream" if content_type.startswith("text/event-stream")
                else "json" if content_type.startswith("application/json") and self.start["status"] == 200
                else "other"
            )
            if self.mode != "json":
                await self._send_start()
        if self.mode == "json":
            return await self._collect_json(message)
        if self.mode == "stream":
            message = {**message, "body": self._annotate_events(message.get("body", b""))}
        await self.send(message)

    async def _send_start(self, body_length: int | None = None) -> None:
        headers = MutableHeaders(raw=list(self.start["headers"]))
        # ASCII-only JSON: header values must be latin-1.
        headers[HEADER] = json.dumps(self.applied.model_dump(exclude_none=True, mode="json"), separators=(",", ":"))
        if body_length is not None:
            headers["content-length"] = str(body_length)
        await self.send({**self.start, "headers": headers.raw})

    async def _collect_json(self, message) -> None:
        self.json_parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self.json_parts)
        try:
            document = json.loads(body)
            _drop_echoed_bos(document, self.echoed_bos)
            document[BODY_FIELD] = self.applied.model_dump(exclude_none=True, mode="json")
            body = _dumps(document)
        except (ValueError, TypeError):
            logger.warning("response body is not a JSON object; %s sent as a header only", BODY_FIELD)
        await self._send_start(len(body))
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def _annotate_events(self, chunk: bytes) -> bytes:
        if self.stream_fields is None and chunk.startswith(b"data: {"):
            try:
                first = json.loads(chunk[len(b"data: "):].split(b"\n\n", 1)[0])
            except ValueError:
                first = {}
            self.stream_fields = {k: first[k] for k in ("id", "object", "created", "model") if k in first}
        done = chunk.find(_DONE)
        if done < 0:
            return chunk
        final = {
            **(self.stream_fields or {}), "choices": [],
            BODY_FIELD: self.applied.model_dump(exclude_none=True, mode="json"),
        }
        return chunk[:done] + b"data: " + _dumps(final) + b"\n\n" + chunk[done:]


class _ModelListSend(_HeldStartSend):
    """vLLM's /v1/models answer, each served model's card followed by its BASE:LANG cards (`routing`)."""

    def __init__(self, send, router: LanguageRouter):
        super().__init__(send)
        self.router = router
        self.parts: list[bytes] = []

    async def body(self, message) -> None:
        self.parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self.parts)
        if self.start["status"] == 200:
            document = json.loads(body)
            document["data"] = [
                listed for card in document["data"]
                for listed in [card, *(self.router.language_model_cards(card)
                                       if card["id"] in self.router.served_models else [])]
            ]
            body = _dumps(document)
        headers = MutableHeaders(raw=list(self.start["headers"]))
        headers["content-length"] = str(len(body))
        await self.send({**self.start, "headers": headers.raw})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


def _drop_echoed_bos(document: dict, choices: frozenset[int]) -> None:
    """Leave the added BOS out of these choices' echoed logprobs, so that entry j is prompt token j as sent
    (lm-eval slices `token_logprobs` by its own context length)."""
    for choice in document.get("choices", []) if choices else []:
        logprobs = choice.get("logprobs") if choice.get("index") in choices else None
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            if logprobs and logprobs.get(key):
                logprobs[key] = logprobs[key][1:]


def _dumps(document) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


async def _read_body(scope, receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed `limit` bytes."""
    declared = Headers(scope=scope).get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            return None
        more = message.get("more_body", False)
    return b"".join(parts)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client to disconnect

    return replayed


def _with_content_length(headers: list, length: int) -> list:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return kept + [(b"content-length", str(length).encode())]


async def _send_openai_error(send, status: HTTPStatus, message: str, param: str | None) -> None:
    # The error types vLLM gives: its own for a bad request and an unknown model, the status phrase for others.
    error_type = _ERROR_TYPES.get(status, status.phrase)
    body = _dumps({"error": {"message": message, "type": error_type, "param": param, "code": status.value}})
    await send({"type": "http.response.start", "status": status.value, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
    ]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
