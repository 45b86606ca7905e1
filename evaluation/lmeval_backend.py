"""The lm-evaluation-harness model `lingosteer`: any lm-eval task through our vLLM engine and plugin.

    lingosteer lm-eval --local-data ../shared/data --model lingosteer \\
        --model_args pretrained=gemma-3-270m,interventions=DIR,language=auto --tasks xcopa_sw,xnli_sw

(`--local-data`: lm-eval's own tasks reading the local files, `evaluation.lmeval_tasks`.)

model_args (comma-separated, lm-eval's syntax):
  pretrained     prepared model name or Hugging Face model directory
  interventions  directory of intervention artifacts, all loaded into the engine; without it
                 every request runs plain
  language       "auto" (default): from the task name's last part (xcopa_sw -> sw -> swh_Latn);
                 English tasks run plain, any other language needs a loaded intervention.
                 A language code: every task steered with it. "none": every task plain.
  alpha          default: the artifact's serving alpha (what a served request naming only its
                 language gets; 0 where `align build`'s gate kept steering off: plain)
  layers         a subset of the intervention's layers, colon-separated (3:5:7), since commas
                 separate model_args (default: the serving layers)
  positions      tokens steered: "last", "prompt" or "all", as a served request's positions with
                 the context as the prompt (`evaluation.scoring`; default: the serving positions).
                 lm-eval's own XNLI scores the whole sentence pair as the continuation of an empty
                 context, where "last" and "prompt" have no context token to steer: a steered run
                 of it needs "all" (`check_steerable_context`)
  dtype          engine dtype (default float32, as the benchmarks); max_model_len; enforce_eager
  batch_size, max_batch_size, device: accepted and ignored (the engine batches by itself)

Tokens are lm-eval's: TemplateLM pairs (context, continuation), and `tok_encode` encodes as
lm-eval's vLLM backend does with its defaults (the tokenizer's own special tokens, none again
before a text that starts with BOS); that backend's class starts an engine of its own, so its
few tokenizer lines are followed here rather than inherited. Scoring goes through
`score_with_vllm` (prefix sharing, logits only for scored rows).
"""

from __future__ import annotations

import weakref
from pathlib import Path

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from alignment.artifact import POSITION_MODES, load_intervention
from evaluation.runner import ENGLISH, find_interventions, start_scoring_engine
from evaluation.scoring import (
    PLAIN,
    Condition,
    Encoded,
    extra_args,
    leading_special,
    score_with_vllm,
    served_condition,
)
from intervene_engine.request_spec import InterventionRequest, position_span
from lingosteer.backend import DEFAULT_MAX_MODEL_LEN, shutdown_engine
from lingosteer.languages import UnknownLanguageError, normalize_code
from lingosteer.models import resolve_model

AUTO, NONE = "auto", "none"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's vLLM backend's default


def resolve_language(task_name: str, language: str, loaded: dict[str, Path]) -> str | None:
    """The FLORES code a task's requests are steered with (None: plain).

    `language` is "auto", "none" or a language code; `loaded` maps FLORES codes to the
    interventions in the engine (empty: everything runs plain)."""
    if not loaded or language == NONE:
        return None
    if language == AUTO:
        code = task_name.rsplit("_", 1)[-1]
        try:
            flores = normalize_code(code)
        except UnknownLanguageError:
            raise ValueError(f"task {task_name!r}: language=auto reads the language from the task name's last "
                             f"part, and {code!r} is no language code; give language=<code> or language=none") from None
    else:
        flores = normalize_code(language)
    if flores == ENGLISH:
        return None
    if flores not in loaded:
        raise ValueError(f"task {task_name!r}: no intervention for {flores} is loaded "
                         f"(loaded: {', '.join(sorted(loaded))}); fit one, or run it with language=none")
    return flores


def check_steerable_context(where: str, encoded: Encoded, condition: Condition) -> None:
    """Refuse a steered request whose position mode is placed relative to a context holding no token after
    BOS. lm-eval's XNLI, for one, asks for the whole sentence pair as the continuation of an empty context
    (BOS): "last" would steer BOS, which no map was fitted on, and "prompt" nothing at all, either way a
    number that is not what the positions mean, given silently."""
    if condition.plain or encoded.context_len > encoded.num_special:
        return
    if position_span(condition.steer, encoded.context_len, encoded.num_special)[1] is not None:
        raise ValueError(f"{where}: the context holds no token after BOS (the task scores the whole text as the "
                         f"continuation), so positions {condition.steer!r}, placed relative to the context, steer "
                         "none of it; give positions=all (every token after BOS)")


def _sampling_kwargs(gen_kwargs: dict, eos: str) -> tuple[dict, list[str], int]:
    """(SamplingParams arguments, stop strings, max tokens) from a task's gen_kwargs, as lm-eval's
    vLLM backend makes them (greedy unless do_sample; EOS among the stop strings)."""
    kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=DEFAULT_MAX_GEN_TOKS)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen_toks = int(kwargs.pop("max_gen_toks"))
    kwargs.pop("do_sample", None)
    return {"skip_special_tokens": False, "spaces_between_special_tokens": False, **kwargs}, until, max_gen_toks


def _parse_layers(layers: str | int | None) -> tuple[int, ...] | None:
    if layers is None or layers == "":
        return None
    return tuple(int(layer) for layer in str(layers).split(":"))


def check_request(request: Instance) -> str:
    """Where a loglikelihood request comes from ("task 'x' item 3"); raises on a broken item.

    A multiple-choice option reaches the model as target_delimiter + option, so an empty
    option is a continuation of whitespace only. A field missing from some items of a JSON
    file is null in those items, and a template renders it as the text "None"."""
    where = f"task {request.task_name!r} item {request.doc_id}"
    context, continuation = request.args
    if not continuation.strip():
        raise ValueError(f"{where}: empty continuation {continuation!r} (an empty option?) "
                         f"after context {context[-60:]!r}")
    missing = [name for name, value in (request.doc or {}).items() if value is None]
    if missing and "None" in context + continuation:
        raise ValueError(f"{where}: field(s) {', '.join(missing)} missing (null), and the request reads "
                         f"{(context + continuation)[-80:]!r}")
    return where


@register_model("lingosteer")
class LingosteerLM(TemplateLM):
    def __init__(self, pretrained: str, interventions: str | None = None, language: str = AUTO,
                 alpha: float | None = None, layers: str | int | None = None, positions: str | None = None,
                 dtype: str = "float32", max_model_len: int = DEFAULT_MAX_MODEL_LEN, enforce_eager: bool = False,
                 batch_size=None, max_batch_size=None, device=None) -> None:
        from transformers import AutoTokenizer

        super().__init__()
        if positions is not None and positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {tuple(POSITION_MODES)}, got {positions!r}")
        model_dir = resolve_model(pretrained)
        self.interventions = find_interventions(Path(interventions), None, model_dir) if interventions else {}
        if language not in (AUTO, NONE):
            if not self.interventions:
                raise ValueError(f"language={language} steers every task with its intervention: give interventions=DIR")
            resolve_language("<every task>", language, self.interventions)  # checked now, not at the first request
        self.language, self.alpha, self.layers, self.positions = language, alpha, _parse_layers(layers), positions
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._max_length = int(max_model_len)
        self._conditions: dict[str, Condition] = {}
        self._pending: list[tuple[str, Condition]] | None = None
        self.llm = start_scoring_engine(model_dir, dtype, max_model_len=self._max_length,
                                        enforce_eager=bool(enforce_eager), skip_tokenizer_init=False)  # text
        self._shutdown = weakref.finalize(self, shutdown_engine, self.llm)
        _OPEN.add(self)
        for path in self.interventions.values():
            self.llm.collective_rpc("lingosteer_load", args=(str(path),))

    def close(self) -> None:
        """Stop the engine now (otherwise when this object is collected, or at exit)."""
        self._shutdown()


    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # The conditioning token of an empty context, as lm-eval's vLLM backend picks it.
        return self.tokenizer.eos_token_id if self.tokenizer.bos_token_id is None else self.tokenizer.bos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if not string:
            return []
        if add_special_tokens is None:
            add_special_tokens = not has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id))
        return self.tokenizer(string, add_special_tokens=add_special_tokens).input_ids

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def condition(self, task_name: str) -> Condition:
        """How a task's requests run, decided once per task."""
        if task_name not in self._conditions:
            language = resolve_language(task_name, self.language, self.interventions)
            if language is None:
                self._conditions[task_name] = PLAIN
            else:
                # What the model_args leave out comes from the artifact's serving defaults: what a
                # served request naming only its language gets (alpha 0 where calibration kept it off).
                spec = InterventionRequest(language, self.alpha, self.layers, self.positions)
                serving = load_intervention(self.interventions[language]).serving
                self._conditions[task_name] = served_condition(spec, serving)
        return self._conditions[task_name]

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # TemplateLM tokenizes and hands `_loglikelihood_tokens` the tokens only, in request
        # order; each request's item and condition wait here for it.
        self._pending = [(check_request(request), self.condition(request.task_name)) for request in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._pending = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self._pending is None or len(self._pending) != len(requests):
            raise RuntimeError("LingosteerLM scores requests through loglikelihood() only")
        special = set(self.tokenizer.all_special_ids)
        scoring = []
        for (pair, context, continuation), (where, condition) in zip(requests, self._pending):
            if not continuation:
                raise ValueError(f"{where}: continuation {pair[1]!r} encodes to no tokens")
            if len(context) + len(continuation) >= self.max_length:
                raise ValueError(f"{where}: {len(context) + len(continuation)} tokens do not fit "
                                 f"max_model_len={self.max_length} (one position is kept for vLLM's output)")
            encoded = Encoded(tuple(context + continuation), len(context), leading_special(context, special))
            check_steerable_context(where, encoded, condition)
            scoring.append((encoded, condition))
        scored = score_with_vllm(self.llm, scoring, progress=not disable_tqdm)
        results = [(float(score), bool(greedy)) for score, greedy in zip(scored.scores, scored.greedy)]
        for (pair, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "the lingosteer model scores loglikelihood and multiple_choice tasks and generates (generate_until); "
            "rolling log-likelihood (perplexity tasks) has no steering position defined: use --model vllm")

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        from vllm import SamplingParams

        eos = self.tokenizer.decode(self.eot_token_id)
        special = set(self.tokenizer.all_special_ids)
        prompts, params, stops = [], [], []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs, until, max_gen_toks = _sampling_kwargs(gen_kwargs, eos)
            ids = self.tok_encode(context)
            if len(ids) + max_gen_toks > self.max_length:
                raise ValueError(f"task {request.task_name!r} item {request.doc_id}: {len(ids)} prompt tokens + "
                                 f"{max_gen_toks} generated do not fit max_model_len={self.max_length}")
            prompt = Encoded(tuple(ids), len(ids), leading_special(ids, special))
            steering = extra_args(prompt, self.condition(request.task_name))
            prompts.append({"prompt_token_ids": ids})
            params.append(SamplingParams(max_tokens=max_gen_toks, stop=until, extra_args=steering, **kwargs))
            stops.append(until)
        outputs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        texts = []
        for request, output, until in zip(requests, outputs, stops):
            text = postprocess_generated_text(output.outputs[0].text, until, None)
            self.cache_hook.add_partial("generate_until", request.args, text)
            texts.append(text)
        return texts


# Models whose engines may still run. At interpreter exit, multiprocessing's exit handler can join the engine's
# process before the model's finalizer has stopped it, and wait forever; `close_all` stops them first.
_OPEN: weakref.WeakSet["LingosteerLM"] = weakref.WeakSet()


def close_all() -> None:
    """Stop the engine of every `lingosteer` model still open (`lingosteer lm-eval` calls it once lm-eval is done)."""
    for model in list(_OPEN):
        model.close()
