"""What one request asks of the plugin, parsed from `SamplingParams.extra_args`.

Over HTTP the same keys arrive as `vllm_xargs`. Keys:
  language   FLORES-200 code of the loaded intervention to apply (required)
  alpha      strength
  layers     subset of the intervention's layers
  positions  "last" (last prompt token, INCLINE), "prompt" (every prompt token after a
             leading BOS), "all" (those and every generated token), or [start, end)
             prompt token ranges, taken as given (BOS is position 0),
             nested [[0, 12], [30, 41]] or flat [0, 12, 30, 41]
             (vLLM's HTTP layer types `vllm_xargs` values as scalars or flat lists)
What a request leaves out comes from the artifact's serving defaults (`resolve`, the one
answer to "what does a request naming only its language get", which the worker, the
server and the benchmarks all call).
The engine core adds `lingosteer_version` (the intervention version bound at
arrival), so a request keeps that version even if the language is swapped.

A scoring request (log-likelihood of a continuation) may also carry
  lingosteer_score_from  the first prompt position whose log-probability it reads;
                         the plugin computes full-vocabulary logits only from there
                         (`prompt_logprobs` rows before it are placeholders), and
                         never reads that row's KV from the prefix cache.

`parse_request_args` reads both once per request in each process that needs them:
the front end (validation), the engine core (binding) and the worker, which keeps
the result by request id until the request finishes (`worker_state.WorkerState`).
"""

from dataclasses import dataclass, replace
from typing import Any

from alignment.artifact import ALPHA_LIMIT, POSITION_MODES, ServingDefaults

LANGUAGE_KEY = "language"
VERSION_KEY = "lingosteer_version"
SCORE_FROM_KEY = "lingosteer_score_from"


class RequestSpecError(ValueError):
    """The request's intervention arguments are malformed."""


@dataclass(frozen=True)
class InterventionRequest:
    language: str
    # None: the serving default (`resolve`)
    alpha: float | None = None
    layers: tuple[int, ...] | None = None
    positions: str | tuple[tuple[int, int], ...] | None = None
    version: str | None = None

    def cache_salt(self) -> str:
        """A prefix-cache key part: KV blocks are shared only by identical interventions."""
        layers = "*" if self.layers is None else ",".join(map(str, self.layers))
        return (
            f"lingosteer:{self.language}:{self.version}:{self.alpha}:{layers}:{self.positions}"
        )

    def spans(self, prompt_len: int, first_steerable: int = 0) -> list[tuple[int, int | None]]:
        """The [start, end) positions steered (end None: on through the generated tokens); given
        ranges are prompt ranges, cut at its end. `first_steerable`: 1 past a leading BOS."""
        if self.positions is None:
            raise ValueError("the positions of an unresolved request are its serving default's: resolve() it first")
        if isinstance(self.positions, str):
            return [position_span(self.positions, prompt_len, first_steerable)]
        return [(start, min(end, prompt_len)) for start, end in self.positions]

    def first_position(self, prompt_len: int) -> int:
        """The first token position this intervention changes: the KV before it is the plain run's.
        Whether the prompt starts with BOS is not known here, so a leading BOS counts as changed."""
        return min(start for start, _ in self.spans(prompt_len))


def resolve(spec: InterventionRequest, serving: ServingDefaults,
            available: tuple[int, ...] | None = None) -> InterventionRequest:
    """What `spec` gets from an intervention whose serving defaults are `serving`: its explicit
    alpha, layers and positions win, the rest are the serving defaults'. `available`: the
    intervention's layers; explicit layers outside them are dropped (the server answers 400 first)."""
    layers = serving.layers if spec.layers is None else spec.layers
    return replace(
        spec,
        alpha=serving.alpha if spec.alpha is None else spec.alpha,
        layers=tuple(layer for layer in layers if available is None or layer in available),
        positions=serving.positions if spec.positions is None else spec.positions,
    )


def position_span(mode: str, prompt_len: int, first_steerable: int = 0) -> tuple[int, int | None]:
    """`POSITION_MODES[mode]` for a prompt of `prompt_len` tokens; raises RequestSpecError on an unknown mode."""
    if mode not in POSITION_MODES:
        raise RequestSpecError(f"position mode must be one of {tuple(POSITION_MODES)}, got {mode!r}")
    return POSITION_MODES[mode](prompt_len, first_steerable)


@dataclass(frozen=True)
class RequestArgs:
    """Everything the plugin reads from one request's extra_args."""

    intervention: InterventionRequest | None
    score_from: int | None


def parse_request_args(extra_args: dict[str, Any] | None) -> RequestArgs:
    """Raises RequestSpecError when either part is malformed."""
    return RequestArgs(parse_request_spec(extra_args), parse_score_from(extra_args))


def parse_score_from(extra_args: dict[str, Any] | None) -> int | None:
    """The first prompt position a scoring request reads (None for other requests)."""
    value = (extra_args or {}).get(SCORE_FROM_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestSpecError(f"'{SCORE_FROM_KEY}' must be a positive int (a prompt position), got {value!r}")
    return value


def parse_request_spec(extra_args: dict[str, Any] | None) -> InterventionRequest | None:
    """None when the request asks for no intervention; raises RequestSpecError when malformed."""
    if not extra_args or extra_args.get(LANGUAGE_KEY) in (None, "", "none"):
        return None
    language = extra_args[LANGUAGE_KEY]
    if not isinstance(language, str):
        raise RequestSpecError(f"'language' must be a string, got {language!r}")
    return InterventionRequest(
        language=language,
        alpha=_parse_alpha(extra_args.get("alpha")),
        layers=_parse_layers(extra_args.get("layers")),
        positions=_parse_positions(extra_args.get("positions")),
        version=extra_args.get(VERSION_KEY),
    )


def _parse_alpha(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestSpecError(f"'alpha' must be a number, got {value!r}")
    if not -ALPHA_LIMIT <= value <= ALPHA_LIMIT:
        raise RequestSpecError(f"'alpha' must lie in [{-ALPHA_LIMIT:g}, {ALPHA_LIMIT:g}], got {value}")
    return float(value)


def _parse_layers(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in value
    ):
        raise RequestSpecError(f"'layers' must be a list of non-negative ints, got {value!r}")
    return tuple(sorted(set(value)))


def flatten_ranges(ranges) -> list[int]:
    """[[s0, e0], [s1, e1]] -> [s0, e0, s1, e1], the form that passes vLLM's HTTP validation."""
    return [bound for pair in ranges for bound in pair]


def _parse_positions(value: Any) -> str | tuple[tuple[int, int], ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (list, tuple)):
        if len(value) % 2:
            raise RequestSpecError(f"flat 'positions' ranges need an even count of bounds, got {value!r}")
        value = [value[i:i + 2] for i in range(0, len(value), 2)]
    if isinstance(value, str):
        if value not in POSITION_MODES:
            raise RequestSpecError(
                f"'positions' must be one of {tuple(POSITION_MODES)} or a list of [start, end) "
                f"ranges, got {value!r}"
            )
        return value
    ranges = []
    for item in value if isinstance(value, (list, tuple)) else [None]:
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            or not 0 <= item[0] < item[1]
        ):
            raise RequestSpecError(
                f"'positions' ranges must be [start, end) pairs with 0 <= start < end, got {value!r}"
            )
        ranges.append((item[0], item[1]))
    if not ranges:
        raise RequestSpecError("'positions' must not be an empty list")
    return tuple(sorted(ranges))
