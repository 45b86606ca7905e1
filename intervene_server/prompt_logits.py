"""Full-vocabulary logits only for the prompt rows a scoring request reads, in one pass per step.

vLLM computes logits for every prompt row of a request that asks for prompt
log-probabilities, one request at a time. Two costs follow for a log-likelihood
scorer, which reads only the rows that predict the continuation:
- arithmetic: with Gemma 3's 262k vocabulary the output layer costs more per row
  than the whole decoder stack, and the context's rows are most of the rows;
- memory traffic: each request's call reads the whole output-layer weight (671 MB
  in float32 for Gemma 3 270M) to multiply a handful of rows.
A request that names `lingosteer_score_from` = p is a scoring request: the logits
of its rows from p - 1 on are computed together with every other scoring
request's in the step, in one matmul; rows before p - 1 get zero logits (their
log-probabilities are placeholders that the caller does not read). Requests that
do not name it (served requests asking for prompt log-probabilities) keep vLLM's
path, bit for bit.

`GPUModelRunner._get_prompt_logprobs_dict` slices each request's rows from the
step's hidden states and calls `model.compute_logits` on them; while it runs,
`compute_logits` is shadowed by a lookup that recognises a scoring request's
slice by its first row.
"""

import torch


def scored_slices(runner, num_scheduled_tokens: dict[str, int]) -> dict[int, tuple[int, int]]:
    """First row of each scoring request in this step -> (rows without logits, rows vLLM will slice).

    The row count follows `_get_prompt_logprobs_dict`: the scheduled tokens, or on the
    prompt's last chunk the rows up to the second-to-last prompt token."""
    slices = {}
    for req_id in runner.num_prompt_logprobs:
        num_tokens = num_scheduled_tokens.get(req_id)
        state = runner.requests.get(req_id)
        if num_tokens is None or state is None or state.prompt_token_ids is None:
            continue
        score_from = runner.lingosteer_state.request(req_id, state).score_from
        remaining = len(state.prompt_token_ids) - (state.num_computed_tokens + 1)
        num_logits = min(num_tokens, remaining)
        if score_from is None or num_logits <= 0:
            continue
        # At least one real row per request, so every slice has the vocabulary's width.
        skip = min(max(score_from - 1 - state.num_computed_tokens, 0), num_logits - 1)
        first_row = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        slices[first_row] = (skip, num_logits)
    return slices


def prompt_logprobs_of_scored_rows(runner, get_prompt_logprobs_dict, hidden_states, num_scheduled_tokens):
    """`get_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens)`, with the logits of
    scoring requests computed only where read, all in one call."""
    slices = scored_slices(runner, num_scheduled_tokens)
    if not slices:
        return get_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens)
    model = runner.model
    compute_logits = model.compute_logits
    rows = torch.cat([torch.arange(first + skip, first + count) for first, (skip, count) in slices.items()])
    scored = compute_logits(hidden_states[rows.to(hidden_states.device)])
    starts, start = {}, 0
    for first, (skip, count) in slices.items():
        starts[first] = start
        start += count - skip
    row_bytes = hidden_states.stride(0) * hidden_states.element_size()

    def compute_scored_logits(prompt_rows: torch.Tensor) -> torch.Tensor:
        first = (prompt_rows.data_ptr() - hidden_states.data_ptr()) // row_bytes
        if first not in slices:
            return compute_logits(prompt_rows)
        skip, count = slices[first]
        logits = scored.new_zeros((count, scored.shape[1]))
        logits[skip:] = scored[starts[first]:starts[first] + count - skip]
        return logits

    model.compute_logits = compute_scored_logits  # an instance attribute shadows the method
    try:
        return get_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens)
    finally:
        del model.compute_logits
