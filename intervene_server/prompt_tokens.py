"""Prompt text and token offsets, computed the way vLLM's OpenAI server builds prompts.

Completions: the prompt string tokenized with special tokens (vLLM's default,
`add_special_tokens=True`). Chat: the conversation rendered with the server's
chat template, then tokenized without adding special tokens (vLLM's chat
default). Offsets let `auto-spans` turn character spans into token ranges;
tests check the token ids against vLLM's own `/tokenize`.
"""

import functools
from dataclasses import dataclass


class PromptError(ValueError):
    """The request's prompt cannot be used for the language routing it asks for."""


@dataclass(frozen=True)
class TextPart:
    """A piece of prompt text whose language matters: the prompt, or one user turn."""

    text: str
    message: int | None = None  # index in `messages` (chat), None for completions


def user_text_parts(payload: dict, endpoint: str) -> list[TextPart]:
    """The text to identify: the completion prompt(s), or the chat's user turns."""
    if endpoint == "completion":
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            return [TextPart(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [TextPart(p) for p in prompt]
        return []  # token-id prompts carry no text to identify
    parts = []
    for index, message in enumerate(payload.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            text = message_text(message.get("content"))
            if text:
                parts.append(TextPart(text, index))
    return parts


def _is_id(token) -> bool:
    return isinstance(token, int) and not isinstance(token, bool)


def message_text(content) -> str:
    """A chat message's text: a string, or its text parts joined by newlines (as vLLM does)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


class PromptTokenizer:
    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @functools.cached_property
    def added_bos(self) -> int | None:
        """The BOS id the tokenizer puts before every text prompt (None: it adds none)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None and self.tokenizer("a").input_ids[:1] == [bos] else None

    def with_bos(self, prompt) -> tuple[object, list[int]]:
        """A token-id completion prompt (one list of ids, or a list of them) with the BOS a text prompt
        would get put before each that lacks it, and the indices of those; other prompts as they are.
        vLLM takes token ids as given, so a client tokenizing without BOS (lm-eval's default) would
        otherwise score a model that never saw a prompt without it."""
        bos = self.added_bos
        single = isinstance(prompt, list) and bool(prompt) and all(_is_id(t) for t in prompt)
        prompts = [prompt] if single else prompt
        if bos is None or not isinstance(prompts, list) or not all(
                isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompts):
            return prompt, []
        added = [i for i, p in enumerate(prompts) if p[0] != bos]
        completed = [[bos, *p] if i in added else p for i, p in enumerate(prompts)]
        return (completed[0] if single else completed), added

    def offsets(self, text: str, add_special_tokens: bool) -> list[tuple[int, int]]:
        try:
            encoded = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        except Exception as error:  # e.g. text the tokenizer cannot encode (lone surrogates)
            raise PromptError(f"cannot tokenize the prompt for auto-spans: {error}") from None
        return [tuple(pair) for pair in encoded["offset_mapping"]]

    def render_chat(self, payload: dict) -> str:
        messages = [
            {**m, "content": message_text(m.get("content"))} if isinstance(m, dict) else m
            for m in payload.get("messages") or []
        ]
        template = payload.get("chat_template") or self.chat_template
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False,
                add_generation_prompt=payload.get("add_generation_prompt", True),
                continue_final_message=payload.get("continue_final_message", False),
                **(payload.get("chat_template_kwargs") or {}),
            )
        except Exception as error:  # jinja errors, missing template: the request cannot be rendered
            raise PromptError(f"cannot render the chat for auto-spans: {error}") from None

    def spans_to_tokens(
        self, payload: dict, endpoint: str, spans: list[tuple[TextPart, int, int]]
    ) -> list[tuple[int, int] | None]:
        """Token range [start, end) of each (part, start_char, end_char) span of the prompt."""
        if endpoint == "completion":
            prompt = payload["prompt"]
            add_special = payload.get("add_special_tokens", True)
            bases = {None: 0}
        else:
            prompt = self.render_chat(payload)
            add_special = payload.get("add_special_tokens", False)
            bases = _locate_parts(prompt, [part for part, _, _ in spans])
        offsets = self.offsets(prompt, add_special)
        return [
            _token_range(offsets, bases[part.message] + start, bases[part.message] + end)
            for part, start, end in spans
        ]


def _locate_parts(rendered: str, parts: list[TextPart]) -> dict[int | None, int]:
    """Where each user turn's text starts in the rendered chat (turns appear in order)."""
    bases, cursor = {}, 0
    for part in sorted({p.message: p for p in parts}.values(), key=lambda p: p.message):
        found = rendered.find(part.text, cursor)
        if found < 0:
            raise PromptError(
                f"auto-spans: the chat template changes the text of message {part.message}, "
                "so its tokens cannot be located"
            )
        bases[part.message] = found
        cursor = found + len(part.text)
    return bases


def _token_range(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """Tokens overlapping characters [start, end); special tokens (empty offsets) never count."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (hits[0], hits[-1] + 1) if hits else None
