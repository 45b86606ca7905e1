"""Full-vocabulary logits only for the prompt rows a scoring request reads.

vLLM computes logits for every prompt row of a request that asks for prompt
log-probabilities. A log-likelihood scorer reads only the rows that predict the
continuation: with Gemma 3's 262k vocabulary the output layer costs more per row
than the whole decoder stack, so the context's rows are most of the arithmetic.
A request that names `lingosteer_score_from` = p gets real logits from row p - 1
on; rows before it get zero logits (their log-probabilities are placeholders that
the caller does not read).

`GPUModelRunner._get_prompt_logprobs_dict` slices one block of rows per request
from the step's hidden states and calls `model.compute_logits` on it; while it
runs, `compute_logits` is shadowed by a version that recognises the slice by its
first row and skips the rows before p - 1.
"""

import torch

from intervene_server.request_spec import RequestSpecError, parse_score_from


def rows_to_skip(runner, num_scheduled_tokens: dict[str, int]) -> dict[int, int]:
    """First row of each scoring request in this step -> how many of its rows need no logits."""
    skips = {}
    for req_id in runner.num_prompt_logprobs:
        state = runner.requests.get(req_id)
        if req_id not in num_scheduled_tokens or state is None or state.sampling_params is None:
            continue
        try:
            score_from = parse_score_from(state.sampling_params.extra_args)
        except RequestSpecError:  # validated by the front end; a bad value only costs speed
            continue
        skip = 0 if score_from is None else score_from - 1 - state.num_computed_tokens
        if skip > 0:
            first_row = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
            skips[first_row] = skip
    return skips


def prompt_logprobs_of_scored_rows(runner, get_prompt_logprobs_dict, hidden_states, num_scheduled_tokens):
    """`get_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens)` with logits only where read."""
    skips = rows_to_skip(runner, num_scheduled_tokens)
    if not skips:
        return get_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens)
    model = runner.model
    compute_logits = model.compute_logits
    row_bytes = hidden_states.stride(0) * hidden_states.element_size()

    def compute_scored_logits(rows: torch.Tensor) -> torch.Tensor:
        skip = skips.get((rows.data_ptr() - hidden_states.data_ptr()) // row_bytes, 0)
        if skip == 0:
            return compute_logits(rows)
        skip = min(skip, rows.shape[0] - 1)  # at least one real row, for the vocabulary width
        scored = compute_logits(rows[skip:])
        logits = scored.new_zeros((rows.shape[0], scored.shape[1]))
        logits[skip:] = scored
        return logits

    model.compute_logits = compute_scored_logits  # an instance attribute shadows the method
    try:
        return get_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens)
    finally:
        del model.compute_logits
