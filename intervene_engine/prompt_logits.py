"""Prompt log-probabilities only for the rows a scoring request reads, in one pass per step.

vLLM computes logits and log-probabilities for every prompt row of a request that
asks for prompt log-probabilities, one request at a time. Three costs follow for a
log-likelihood scorer, which reads only the rows that predict the continuation:
- arithmetic: with Gemma 3's 262k vocabulary the output layer costs more per row
  than the whole decoder stack, and the context's rows are most of the rows;
- memory traffic: each request's call reads the whole output-layer weight (671 MB
  in float32 for Gemma 3 270M) to multiply a handful of rows;
- the log-softmax and the rank of the prompt token, each a pass over 262k floats
  (1 MiB) per row, for rows nobody reads.
A request that names `lingosteer_score_from` = p is a scoring request: its rows from
p - 1 on get logits, log-probabilities and ranks together with every other scoring
request's in the step (one matmul, one log-softmax; the same sampler functions as
vLLM's path, so the same values); its rows before p - 1 are placeholders
(`NOT_COMPUTED`), never computed. Requests that do not name it (served requests
asking for prompt log-probabilities) keep vLLM's path, bit for bit.
"""

import torch

# A placeholder row's log-probability and rank: read by mistake, it poisons a sum
# (and the OpenAI server clamps it to -9999, as it does any -inf).
NOT_COMPUTED = (float("-inf"), -1)

# Rows per log-softmax and rank pass: 8 rows of 262k float32 logits (8 MiB) stay in cache
# between the two passes; a whole step's rows at once (~450 MB) measured 4x slower per row.
ROWS_PER_PASS = 8


def log_probabilities(runner, logits: torch.Tensor) -> torch.Tensor:
    """What vLLM's prompt-logprob path makes of a request's logits (its `logprobs_mode`)."""
    if runner.model_config.logprobs_mode in ("raw_logits", "processed_logits"):
        return logits.to(torch.float32)
    return runner.sampler.compute_logprobs(logits)


def scored_slices(runner, num_scheduled_tokens: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    """Each scoring request in this step -> (its first row in the step, rows skipped, rows with a next token).

    The row count follows `_get_prompt_logprobs_dict`: the scheduled tokens, or on the
    prompt's last chunk the rows up to the second-to-last prompt token. A request with no
    row left is not listed (vLLM's path completes it)."""
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
        skip = min(max(score_from - 1 - state.num_computed_tokens, 0), num_logits)
        first_row = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        slices[req_id] = (first_row, skip, num_logits)
    return slices


def prompt_logprobs_of_scored_rows(runner, get_prompt_logprobs_dict, hidden_states, num_scheduled_tokens):
    """`get_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens)` (vLLM's), with every
    scoring request's read rows computed together and its other rows left as placeholders."""
    from vllm.v1.outputs import LogprobsTensors

    slices = scored_slices(runner, num_scheduled_tokens)
    scoring = {req_id: runner.num_prompt_logprobs.pop(req_id) for req_id in slices}
    try:  # vLLM's path for every other request
        prompt_logprobs = get_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens)
    finally:
        runner.num_prompt_logprobs.update(scoring)
    if not slices:
        return prompt_logprobs

    read = {req_id: (first + skip, count - skip) for req_id, (first, skip, count) in slices.items() if count > skip}
    if read:
        rows = torch.cat([torch.arange(row, row + n) for row, n in read.values()])
        logits = runner.model.compute_logits(hidden_states[rows.to(hidden_states.device)])

    start = 0
    for req_id, (_, skip, count) in slices.items():
        request, num_logprobs = runner.requests[req_id], scoring[req_id]
        prompt_token_ids = request.prompt_token_ids
        tensors = request.in_progress_prompt_logprobs_cpu
        if tensors is None:
            tensors = LogprobsTensors.empty_cpu(len(prompt_token_ids) - 1, num_logprobs + 1)
            request.in_progress_prompt_logprobs_cpu = tensors
        done = request.num_computed_tokens  # row done + i predicts prompt token done + i + 1
        placeholders = slice(done, done + skip)
        tensors.logprob_token_ids[placeholders] = torch.tensor(
            prompt_token_ids[done + 1:done + 1 + skip], dtype=torch.int32)[:, None]
        tensors.logprobs[placeholders], tensors.selected_token_ranks[placeholders] = NOT_COMPUTED
        if req_id in read:
            targets = torch.tensor(prompt_token_ids[done + 1 + skip:done + 1 + count], device=logits.device)
            for row in range(0, count - skip, ROWS_PER_PASS):
                rows = slice(row, min(row + ROWS_PER_PASS, count - skip))
                token_ids, logprobs, ranks, *_ = runner.sampler.gather_logprobs(
                    log_probabilities(runner, logits[start + rows.start:start + rows.stop]), num_logprobs,
                    targets[rows])
                written = slice(done + skip + rows.start, done + skip + rows.stop)
                tensors.logprob_token_ids[written].copy_(token_ids)
                tensors.logprobs[written].copy_(logprobs)
                tensors.selected_token_ranks[written].copy_(ranks)
            start += count - skip
        # As vLLM does: complete on the step that schedules the prompt's last token (the one
        # that also samples), though the rows may all have been computed a step earlier.
        if num_scheduled_tokens[req_id] > len(prompt_token_ids) - 1 - done:
            prompt_logprobs[req_id] = tensors
            del runner.num_prompt_logprobs[req_id]
            request.in_progress_prompt_logprobs_cpu = None
    return prompt_logprobs
