"""Log-likelihood of each option given its context: through vLLM, or through HF transformers.

Tokenization follows lm-evaluation-harness: the context is encoded alone (with the
tokenizer's BOS), context + option is encoded whole, and the option's tokens are
the whole encoding past the context's length. The score of an option is the sum of
its tokens' log-probabilities; the option with the highest score is the prediction.

Where to steer: a served request's position modes (`intervene_engine.request_spec.POSITION_MODES`),
with the context as the prompt and the option's tokens as what follows it, so a
scoring request steers the tokens a served one would. As [start, end) ranges:
- "last":   the last context token. INCLINE steers the last prompt token, the one
            the answer is predicted from; in log-likelihood scoring that is the
            last token before the option. The default.
- "prompt": every context token after BOS (the alignment maps were fitted on
            sentence tokens, never on BOS).
- "all":    context and option tokens (after BOS).

vLLM: one request per (option, condition) with `prompt_logprobs=0`, all submitted
in one `generate` call so the engine batches them. By default (`shared_prefix`)
only the necessary arithmetic is done, in the serving engine and plugin:
- requests are submitted grouped by prompt and read the prefix cache (vLLM skips
  it for prompt-logprob requests unless told otherwise), so an item's options and
  every steering condition share the KV blocks of the context before the first
  steered token (the plugin salts blocks only from there on);
- each request names its first scored position (`lingosteer_score_from`), so the
  plugin computes full-vocabulary logits only for the rows that predict the
  option, and keeps that row's block out of the cache (vLLM returns no
  log-probabilities for rows it read from the cache);
- the prompt stops before the option's last token, which is scored as the one
  token the request samples (its log-probability asked for by id,
  `logprob_token_ids`): the engine computes logits for a request's last row to
  sample from anyway, and no row is computed for what would follow the option.
`shared_prefix=False` is the plain way: every request computes its whole prompt
and logits for every row (the reference the fast way is checked against).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from alignment.artifact import DEFAULT_POSITIONS, ServingDefaults
from evaluation.tasks import Example
from intervene_engine.request_spec import SCORE_FROM_KEY, InterventionRequest, position_span, resolve


@dataclass(frozen=True)
class Encoded:
    """One option of one item as token ids: context tokens first, then the option's."""

    token_ids: tuple[int, ...]
    context_len: int  # number of context tokens, BOS included
    num_special: int  # leading special tokens (BOS), never steered


@dataclass(frozen=True)
class Condition:
    """How a request runs: plain (language None) or steered with an intervention and alpha."""

    language: str | None = None  # FLORES code of the loaded intervention
    alpha: float = 0.0
    steer: str = DEFAULT_POSITIONS  # a position mode
    layers: tuple[int, ...] | None = None  # a subset of the intervention's layers; None: all of them

    @property
    def plain(self) -> bool:
        return self.language is None


PLAIN = Condition()


def served_condition(spec: InterventionRequest, serving: ServingDefaults) -> Condition:
    """How a served request with `spec` runs (`request_spec.resolve`: what it leaves out is the serving
    defaults'); alpha 0 leaves the stream unchanged, so it is the plain run. `spec` names a position mode."""
    resolved = resolve(spec, serving)
    return PLAIN if resolved.alpha == 0 else Condition(
        resolved.language, float(resolved.alpha), resolved.positions, resolved.layers)


def leading_special(token_ids, special_ids: set[int]) -> int:
    """How many tokens at the start are special (BOS): they are never steered."""
    return next((i for i, t in enumerate(token_ids) if t not in special_ids), len(token_ids))


def encode_examples(tokenizer, examples: list[Example]) -> list[list[Encoded]]:
    """Token ids of every option of every example (fast tokenizer, batched)."""
    contexts = tokenizer([ex.context for ex in examples])["input_ids"]
    wholes = tokenizer([ex.context + option for ex in examples for option in ex.options])["input_ids"]
    special = set(tokenizer.all_special_ids)
    encoded, k = [], 0
    for ex, context in zip(examples, contexts):
        num_special = leading_special(context, special)
        options = []
        for option in ex.options:
            continuation = wholes[k][len(context):]
            k += 1
            if not continuation:
                raise ValueError(f"option {option!r} of context {ex.context[:60]!r} encodes to no tokens")
            options.append(Encoded(tuple(context) + tuple(continuation), len(context), num_special))
        encoded.append(options)
    return encoded


def steer_ranges(encoded: Encoded, mode: str) -> list[list[int]]:
    """The prompt token ranges a position mode selects for this option (the context is the prompt)."""
    start, end = position_span(mode, encoded.context_len, encoded.num_special)
    return [[start, len(encoded.token_ids) if end is None else end]]


def extra_args(encoded: Encoded, condition: Condition) -> dict | None:
    """The plugin's request arguments (`SamplingParams.extra_args`); None for plain requests."""
    if condition.plain:
        return None
    args = {"language": condition.language, "alpha": float(condition.alpha),
            "positions": steer_ranges(encoded, condition.steer)}
    if condition.layers is not None:
        args["layers"] = list(condition.layers)
    return args


def option_loglikelihood(encoded: Encoded, token_logprobs) -> float:
    """Sum of the option tokens' log-probabilities; `token_logprobs[j]` is log p(token j | tokens < j)."""
    return float(sum(token_logprobs[j] for j in range(encoded.context_len, len(encoded.token_ids))))


@dataclass
class VllmScores:
    scores: np.ndarray  # summed option log-likelihood per request
    greedy: np.ndarray  # bool per request: every option token is the top-ranked one (lm-eval's is_greedy)
    seconds: float  # wall time of `generate`
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


def score_with_vllm(llm, requests: list[tuple[Encoded, Condition]], progress: bool = True,
                    shared_prefix: bool = True) -> VllmScores:
    """Summed option log-likelihoods of every request, through the engine (see the module notes)."""
    from vllm import SamplingParams

    def prompt(enc: Encoded) -> Encoded:
        """What the engine is sent: with `shared_prefix`, all but the option's last token (sampled)."""
        return Encoded(enc.token_ids[:-1], enc.context_len, enc.num_special) if shared_prefix else enc

    def params(enc: Encoded, cond: Condition) -> SamplingParams:
        if not shared_prefix:
            return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args=extra_args(enc, cond))
        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                              logprob_token_ids=[enc.token_ids[-1]], skip_reading_prefix_cache=False,
                              extra_args={**(extra_args(prompt(enc), cond) or {}), SCORE_FROM_KEY: enc.context_len})

    # Neighbours in submission order share their context's blocks (they are cached when allocated).
    order = sorted(range(len(requests)), key=lambda i: requests[i][0].token_ids) if shared_prefix \
        else list(range(len(requests)))
    prompts = [{"prompt_token_ids": list(prompt(requests[i][0]).token_ids)} for i in order]
    start = time.perf_counter()
    outputs = llm.generate(prompts, [params(*requests[i]) for i in order], use_tqdm=progress)
    seconds = time.perf_counter() - start
    scores, greedy = np.empty(len(requests)), np.empty(len(requests), dtype=bool)
    cached = 0
    for i, output in zip(order, outputs):
        enc = requests[i][0]
        if output.num_cached_tokens and output.num_cached_tokens > enc.context_len - 1:
            raise RuntimeError(
                f"vLLM read {output.num_cached_tokens} prompt tokens from the prefix cache, past the first scored "
                f"row ({enc.context_len - 1}): is the lingosteer plugin installed in this engine?")
        cached += output.num_cached_tokens or 0
        # Rows before the option are placeholders (or were never computed): read only the option's.
        sent = len(output.prompt_token_ids)
        option = [output.prompt_logprobs[j][enc.token_ids[j]] for j in range(enc.context_len, sent)]
        logprobs, top_ranked = [entry.logprob for entry in option], [entry.rank == 1 for entry in option]
        if sent < len(enc.token_ids):  # the last token was sampled, its log-probability asked for by id
            last, sampled = enc.token_ids[-1], output.outputs[0]
            logprobs.append(sampled.logprobs[0][last].logprob)
            top_ranked.append(sampled.token_ids[0] == last)  # greedy: sampling picked it
        scores[i], greedy[i] = float(sum(logprobs)), all(top_ranked)
    return VllmScores(scores, greedy, seconds, sum(len(p["prompt_token_ids"]) for p in prompts), cached)


def score_with_hf(model, requests: list[tuple[Encoded, Condition]], interventions: dict, pad_id: int,
                  batch_size: int = 8, progress: bool = True) -> tuple[np.ndarray, float]:
    """The same scores from HF transformers with `alignment.hf_steering.steered` hooks (the
    INCLINE-style reference). Consecutive requests with the same condition share a padded batch.

    `interventions` maps a FLORES code to a loaded `alignment.artifact.Intervention`.
    """
    import torch
    from torch.nn.utils.rnn import pad_sequence
    from tqdm.auto import tqdm

    from alignment.hf_steering import steered  # local: loads torch; only the HF reference path needs it

    batches, current = [], []
    for index, (enc, cond) in enumerate(requests):
        if current and (cond != requests[current[0]][1] or len(current) == batch_size):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)

    scores = np.empty(len(requests))
    start = time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(batches, desc="HF reference", unit="batch", disable=not progress):
            encs = [requests[i][0] for i in batch]
            cond = requests[batch[0]][1]
            rows = [torch.tensor(enc.token_ids, dtype=torch.long) for enc in encs]
            ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
            attention = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True)
            mask = torch.zeros(ids.shape, dtype=torch.bool)
            for row, enc in enumerate(encs):
                if not cond.plain:
                    for lo, hi in steer_ranges(enc, cond.steer):
                        mask[row, lo:hi] = True
            if cond.plain:
                logits = model(input_ids=ids, attention_mask=attention).logits
            else:
                with steered(model, interventions[cond.language], mask, alpha=cond.alpha,
                             layers=None if cond.layers is None else list(cond.layers)):
                    logits = model(input_ids=ids, attention_mask=attention).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, (i, enc) in enumerate(zip(batch, encs)):
                targets = torch.tensor(enc.token_ids[1:])
                # position j - 1 predicts token j
                token_logprobs = [None] + logprobs[row, : len(enc.token_ids) - 1].gather(
                    1, targets[:, None])[:, 0].tolist()
                scores[i] = option_loglikelihood(enc, token_logprobs)
    return scores, time.perf_counter() - start
