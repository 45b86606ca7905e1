"""The plugin's pure parts: request arguments, which rows of a step are steered, which get logits."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from alignment.artifact import POSITION_MODES, ServingDefaults
from evaluation.scoring import Encoded, steer_ranges
from intervene_engine.prompt_logits import prompt_logprobs_of_scored_rows, scored_slices
from intervene_engine.request_spec import (
    SCORE_FROM_KEY, InterventionRequest, RequestSpecError, parse_request_spec, parse_score_from, resolve,
)
from intervene_engine.bank import BankConfig, CompactMap, DeviceBank
from intervene_engine.step_plan import ScheduledRequest, StepBuffers, build_step_plan, selected_rows
from intervene_engine.store import LoadedIntervention


def test_no_language_means_no_intervention():
    assert parse_request_spec(None) is None
    assert parse_request_spec({"other": 1}) is None
    assert parse_request_spec({"language": "none"}) is None


def test_full_spec_is_parsed_and_normalised():
    spec = parse_request_spec(
        {"language": "swh_Latn", "alpha": 0.5, "layers": [3, 1, 3], "positions": [[4, 9], [0, 2]]})
    assert spec == InterventionRequest("swh_Latn", 0.5, (1, 3), ((0, 2), (4, 9)))


def test_flat_ranges_equal_nested_ranges():
    flat = parse_request_spec({"language": "swh_Latn", "positions": [4, 9, 0, 2]})
    nested = parse_request_spec({"language": "swh_Latn", "positions": [[0, 2], [4, 9]]})
    assert flat == nested and flat.positions == ((0, 2), (4, 9))


@pytest.mark.parametrize("extra", [
    {"language": 5},
    {"language": "swh_Latn", "alpha": "strong"},
    {"language": "swh_Latn", "alpha": True},
    {"language": "swh_Latn", "alpha": 50},
    {"language": "swh_Latn", "layers": [-1]},
    {"language": "swh_Latn", "layers": "all"},
    {"language": "swh_Latn", "positions": "first"},
    {"language": "swh_Latn", "positions": [[5, 2]]},
    {"language": "swh_Latn", "positions": []},
    {"language": "swh_Latn", "positions": [1, 4, 6]},
])
def test_malformed_spec_is_rejected(extra):
    with pytest.raises(RequestSpecError):
        parse_request_spec(extra)


def test_cache_salt_differs_whenever_the_intervention_differs():
    base = InterventionRequest("swh_Latn", version="v1")
    variants = [
        InterventionRequest("ita_Latn", version="v1"),
        InterventionRequest("swh_Latn", version="v2"),
        InterventionRequest("swh_Latn", alpha=0.5, version="v1"),
        InterventionRequest("swh_Latn", layers=(1,), version="v1"),
        InterventionRequest("swh_Latn", positions="all", version="v1"),
    ]
    salts = {base.cache_salt(), *(v.cache_salt() for v in variants)}
    assert len(salts) == 1 + len(variants)


def _intervention(version="v1", layers=(0, 1), dim=4, alpha=1.0):
    """A full map with D^T = (layer + 1) I and b = 0 at each layer."""
    compact = CompactMap("full", tuple(layers), torch.stack([torch.eye(dim) * (layer + 1) for layer in layers]),
                         None, torch.zeros(len(layers), dim))
    return LoadedIntervention(
        language="swh_Latn", target="eng_Latn", version=version, path="/x",
        serving=ServingDefaults(alpha=alpha, layers=layers, positions="last"), evidence=None,
        layers=tuple(layers), form="full", memory_bytes=compact.memory_bytes, compact=compact,
    )


def _bank(dim=4):
    return DeviceBank(BankConfig(max_languages=2, max_cpu_languages=2, max_map_rank=None), 2, dim, torch.float32,
                      torch.device("cpu"))


def _scheduled(first_row, num_rows, num_computed, prompt_len, positions, first_steerable=0, **spec):
    intervention = _intervention()
    resolved = resolve(InterventionRequest("swh_Latn", positions=positions, **spec), intervention.serving,
                       intervention.layers)
    return ScheduledRequest(first_row, num_rows, num_computed, prompt_len, first_steerable, resolved, intervention)


def test_what_a_request_leaves_out_comes_from_the_serving_defaults():
    serving = ServingDefaults(alpha=0.5, layers=(1, 2), positions="prompt")
    assert resolve(InterventionRequest("swh_Latn"), serving) == InterventionRequest(
        "swh_Latn", alpha=0.5, layers=(1, 2), positions="prompt")
    explicit = InterventionRequest("swh_Latn", alpha=-1.0, layers=(0, 3), positions=((2, 4),))
    assert resolve(explicit, serving) == explicit
    assert resolve(explicit, serving, available=(0, 1, 2)).layers == (0,)  # the artifact has no layer 3
    with pytest.raises(ValueError, match="resolve"):
        InterventionRequest("swh_Latn").spans(5)  # unresolved positions are not guessed


def test_the_worker_steers_a_language_only_request_with_the_serving_defaults():
    """What plain `vllm serve` and an offline vllm.LLM get: no server fills the defaults in."""
    runner = _steering_runner({"r": {"language": "swh_Latn", "lingosteer_version": "v1"}}, {"r": 4})
    state = runner.lingosteer_state
    calibrated = _intervention("v1", layers=(0, 1))
    state.store.install(replace(calibrated, serving=ServingDefaults(alpha=0.25, layers=(1,), positions="prompt")))
    plan = state.plan_step(runner)
    [step] = plan.passes
    # The serving layers only, not every layer of the artifact.
    assert step.alpha[:5].tolist() == [[0, 0.25]] * 4 + [[0, 0]] and step.slot[:5].tolist() == [1] * 4 + [0]


@pytest.mark.parametrize("positions, num_computed, num_rows, expected", [
    ("last", 0, 10, [19]),            # whole prompt in one step: last prompt row
    ("last", 0, 6, []),               # first chunk of a chunked prefill: not yet
    ("last", 6, 4, [13]),             # second chunk holds the last prompt token
    ("last", 10, 1, []),              # decode step: generated tokens untouched
    ("prompt", 6, 4, [10, 11, 12, 13]),
    ("prompt", 10, 1, []),
    ("all", 10, 1, [10]),
    (((1, 3), (8, 50)), 0, 10, [11, 12, 18, 19]),  # ranges clipped to the prompt
    (((1, 3), (8, 50)), 6, 4, [12, 13]),
])
def test_selected_rows(positions, num_computed, num_rows, expected):
    # The request's rows start at flattened row 10; its prompt has 10 tokens.
    rows = selected_rows(_scheduled(10, num_rows, num_computed, 10, positions))
    assert rows.tolist() == expected


@pytest.mark.parametrize("positions, expected", [
    ("prompt", [11, 12, 13, 14]), ("all", [11, 12, 13, 14]), ("last", [14]),
    (((0, 2),), [10, 11]),  # explicit ranges are taken as given
])
def test_a_leading_bos_is_steered_only_when_asked_for_explicitly(positions, expected):
    # Prompt of 5 tokens starting with BOS, prefilled in one step from flattened row 10.
    assert selected_rows(_scheduled(10, 5, 0, 5, positions, first_steerable=1)).tolist() == expected


def test_artifacts_store_the_position_modes_requests_take():
    for mode in POSITION_MODES:
        assert ServingDefaults(alpha=1.0, layers=(0,), positions=mode).positions == mode
        assert parse_request_spec({"language": "swh_Latn", "positions": mode}).positions == mode
    with pytest.raises(ValueError):
        ServingDefaults(alpha=1.0, layers=(0,), positions="context")
    with pytest.raises(RequestSpecError):
        parse_request_spec({"language": "swh_Latn", "positions": "context"})


@pytest.mark.parametrize("mode", POSITION_MODES)
def test_a_scoring_request_steers_what_a_served_one_would(mode):
    """The benchmark reads the same table: its context is the prompt, the option's tokens what follows it."""
    option = Encoded(tuple(range(8)), context_len=5, num_special=1)  # BOS + 4 context tokens + 3 option tokens
    scored = [i for start, end in steer_ranges(option, mode) for i in range(start, end)]
    # A served prompt of the same 5 tokens and 3 tokens after it, all rows from flattened row 0.
    assert selected_rows(_scheduled(0, 8, 0, 5, mode, first_steerable=1)).tolist() == scored


def test_worker_marks_prompts_that_start_with_bos():
    from types import SimpleNamespace

    from intervene_engine.worker_state import WorkerState

    state = WorkerState("LlamaForCausalLM", "unused", 2, torch.device("cpu"), 16, 4, bos_token_id=2)
    state.store.install(_intervention("v1"))
    extra = {"language": "swh_Latn", "lingosteer_version": "v1"}
    with_bos = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), prompt_token_ids=[2, 9, 9])
    without = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), prompt_token_ids=[9, 2, 9])
    assert state.request("a", with_bos).first_steerable == 1
    assert state.request("b", without).first_steerable == 0


def test_plan_writes_each_rows_slot_and_alpha_at_each_layer():
    reqs = [
        _scheduled(0, 3, 0, 3, "all", alpha=0.5),
        _scheduled(3, 1, 5, 5, "all"),            # default alpha 1.0
        _scheduled(4, 2, 0, 2, "all", layers=(1,)),  # layer 1 only
    ]
    [step] = build_step_plan(reqs, StepBuffers(16, 2, torch.device("cpu")), _bank()).passes
    assert step.slot[:8].tolist() == [1] * 6 + [0, 0]  # one version, one slot; 0: not steered
    assert step.alpha[:8, 0].tolist() == [0.5, 0.5, 0.5, 1.0, 0, 0, 0, 0]
    assert step.alpha[:8, 1].tolist() == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 0, 0]
    assert step.matmul


def test_plan_is_none_when_no_row_is_selected():
    plan = build_step_plan([_scheduled(0, 1, 10, 5, "last")], StepBuffers(16, 2, torch.device("cpu")), _bank())
    assert plan is None


def test_step_plans_are_filled_into_buffers_allocated_once_and_cleared_between_steps():
    buffers = StepBuffers(16, 2, torch.device("cpu"))
    bank = _bank()
    build_step_plan([_scheduled(0, 5, 0, 5, "all", alpha=0.5)], buffers, bank)
    [step] = build_step_plan([_scheduled(1, 2, 0, 2, "all", alpha=2.0, layers=(1,))], buffers, bank).passes
    assert step.slot is buffers.slot.gpu and step.alpha is buffers.alpha.gpu  # the one allocation, every step
    assert step.slot[:6].tolist() == [0, 1, 1, 0, 0, 0]  # the previous step's rows 0..4 are cleared
    assert step.alpha[:6].tolist() == [[0, 0], [0, 2.0], [0, 2.0], [0, 0], [0, 0], [0, 0]]


def test_a_step_mixing_more_versions_than_slots_steers_the_rest_from_a_bank_of_its_own():
    from intervene_engine.residual_op import active_plan

    versions = [_intervention(f"v{i}") for i in range(3)]  # D^T = (layer + 1) I for each
    reqs = [ScheduledRequest(i, 1, 0, 1, 0, resolve(InterventionRequest("swh_Latn", positions="all",
                                                                        alpha=0.5 * (i + 1)), v.serving, v.layers), v)
            for i, v in enumerate(versions)]
    bank = _bank()  # two slots
    plan = build_step_plan(reqs, StepBuffers(16, 2, torch.device("cpu")), bank)
    assert len(plan.passes) == 2 and bank.overflows == 1
    assert plan.passes[0].bank is bank and plan.passes[1].bank is not bank
    hidden, residual = torch.zeros(4, 4), torch.ones(4, 4)
    with active_plan(plan):
        torch.ops.lingosteer.steer_residual(hidden, residual, 1)
    assert residual[:, 0].tolist() == [1 + 0.5 * 2, 1 + 1.0 * 2, 1 + 1.5 * 2, 1]  # h + alpha (2 I) h; row 3 plain


def test_op_updates_only_selected_rows_with_the_formula():
    from intervene_engine.residual_op import active_plan

    torch.manual_seed(0)
    hidden, residual = torch.randn(6, 4), torch.randn(6, 4)
    hidden_before, residual_before = hidden.clone(), residual.clone()
    plan = build_step_plan([_scheduled(2, 2, 0, 2, "all", alpha=0.5)], StepBuffers(16, 2, torch.device("cpu")),
                           _bank())
    with active_plan(plan):
        torch.ops.lingosteer.steer_residual(hidden, residual, 1)
    stream = hidden_before[2:4] + residual_before[2:4]
    expected = stream + 0.5 * (stream @ (2 * torch.eye(4)))  # D = 2 I at layer 1, b = 0
    assert torch.allclose(residual[2:4], expected) and torch.all(hidden[2:4] == 0)
    untouched = [0, 1, 4, 5]
    assert torch.equal(hidden[untouched], hidden_before[untouched])
    assert torch.equal(residual[untouched], residual_before[untouched])


def test_first_steered_position_of_each_mode():
    assert InterventionRequest("swh_Latn", positions="last").first_position(20) == 19
    assert InterventionRequest("swh_Latn", positions="prompt").first_position(20) == 0
    assert InterventionRequest("swh_Latn", positions="all").first_position(20) == 0
    assert InterventionRequest("swh_Latn", positions=((7, 9), (3, 5))).first_position(20) == 3


@pytest.mark.parametrize("value", [0, -3, 2.5, "7", True])
def test_malformed_score_from_is_rejected(value):
    with pytest.raises(RequestSpecError, match="lingosteer_score_from"):
        parse_score_from({SCORE_FROM_KEY: value})
    assert parse_score_from({"language": "swh_Latn"}) is None


def _runner_with(requests: dict[str, tuple[int | None, int, int]], scheduled: dict[str, int]):
    """A stand-in for vLLM's model runner (its sampler is vLLM's): request id -> (score_from,
    num_computed_tokens, prompt length); prompt token i is i % 11."""
    from types import SimpleNamespace

    from vllm.v1.sample.sampler import Sampler

    from intervene_engine.worker_state import WorkerState

    states = {rid: SimpleNamespace(num_computed_tokens=done, prompt_token_ids=[i % 11 for i in range(length)],
                                   in_progress_prompt_logprobs_cpu=None,
                                   sampling_params=SimpleNamespace(
                                       extra_args=None if score_from is None else {SCORE_FROM_KEY: score_from}))
              for rid, (score_from, done, length) in requests.items()}
    order = list(scheduled)
    starts = np.cumsum([0] + [scheduled[rid] for rid in order])
    return SimpleNamespace(num_prompt_logprobs=dict.fromkeys(requests, 0), requests=states,
                           query_start_loc=SimpleNamespace(np=starts),
                           input_batch=SimpleNamespace(req_id_to_index={rid: i for i, rid in enumerate(order)}),
                           model_config=SimpleNamespace(logprobs_mode="raw_logprobs"), sampler=Sampler,
                           lingosteer_state=WorkerState("LlamaForCausalLM", "unused", 2, torch.device("cpu"), 16, 4))


def test_scoring_requests_get_log_probabilities_only_for_rows_they_read_in_one_call():
    # a: 10 prompt rows in this step (prompt of 14), reads from position 8 (rows 7..9), more chunks follow;
    # b: asks for prompt logprobs without scoring (a served request): vLLM's own path;
    # c: last chunk (6 of 10 tokens done, 4 now, rows 6..8 have a next token), reads from position 9.
    scheduled = {"a": 10, "b": 5, "c": 4}
    runner = _runner_with({"a": (8, 0, 14), "b": (None, 0, 9), "c": (9, 6, 10)}, scheduled)
    hidden = torch.randn(19, 3)
    weight = torch.randn(3, 11)
    computed_rows, vllm_path_saw = [], []

    def compute_logits(rows):
        computed_rows.append(rows.shape[0])
        return rows @ weight

    runner.model = SimpleModel(compute_logits)

    def get_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens):
        vllm_path_saw.append(set(runner.num_prompt_logprobs))
        return {"b": runner.model.compute_logits(hidden_states[10:15])}  # vLLM's loop, reduced to b

    assert scored_slices(runner, scheduled) == {"a": (0, 7, 10), "c": (15, 2, 3)}
    out = prompt_logprobs_of_scored_rows(runner, get_prompt_logprobs_dict, hidden, scheduled)
    assert vllm_path_saw == [{"b"}] and computed_rows == [5, 3 + 1]  # b alone, then a's and c's read rows at once
    logprobs = (hidden @ weight).log_softmax(-1)
    torch.testing.assert_close(out["b"], hidden[10:15] @ weight)

    def expect(tensors, rows, first, skip, count):
        targets = torch.tensor([(first + i + 1) % 11 for i in range(skip, count)])
        wanted = logprobs[rows].gather(1, targets[:, None])[:, 0]
        torch.testing.assert_close(tensors.logprobs[first + skip:first + count, 0], wanted)
        assert torch.equal(tensors.logprob_token_ids[first + skip:first + count, 0], targets.int())
        ranks = (logprobs[rows] >= wanted[:, None]).sum(-1)
        assert torch.equal(tensors.selected_token_ranks[first + skip:first + count], ranks)
        assert torch.isneginf(tensors.logprobs[first:first + skip]).all()  # placeholders, never computed
        assert (tensors.selected_token_ranks[first:first + skip] == -1).all()

    # c's prompt is complete (returned, no longer pending); a's stays in progress for its next chunk.
    assert set(out) == {"b", "c"} and set(runner.num_prompt_logprobs) == {"a", "b"}
    expect(out["c"], [17], first=6, skip=2, count=3)
    assert runner.requests["c"].in_progress_prompt_logprobs_cpu is None
    expect(runner.requests["a"].in_progress_prompt_logprobs_cpu, [7, 8, 9], first=0, skip=7, count=10)


class SimpleModel:
    """A model whose `compute_logits` is a method, as vLLM's are."""

    def __init__(self, compute_logits):
        self._compute_logits = compute_logits

    def compute_logits(self, rows):
        return self._compute_logits(rows)


def _save_shift(path, source, fingerprint):
    from alignment.artifact import save_intervention
    from alignment.estimator import LinearAligner

    states = np.random.default_rng(0).normal(size=(1, 8, 4))
    return save_intervention(path, LinearAligner(solver="meanshift").fit(states, states + 1.0), fingerprint=fingerprint,
                             source=source, target="eng_Latn", layers=[0], pooling="mean", fit_data={})


def test_preloading_finds_nested_artifacts_of_this_model_and_refuses_empty_entries(tmp_path, monkeypatch):
    from intervene_engine.worker_state import PRELOAD_ENV, WorkerState, _preload_paths

    fingerprint = {"architecture": "LlamaForCausalLM", "hidden_size": 4, "num_hidden_layers": 2}
    state = WorkerState("LlamaForCausalLM", "unused", 2, torch.device("cpu"), 16, 4, _fingerprint=fingerprint)
    swahili = _save_shift(tmp_path / "root" / "llama" / "swh", "swh_Latn", fingerprint)
    _save_shift(tmp_path / "root" / "llama" / ".ita_Latn.build.xyz", "ita_Latn", fingerprint)  # a writer's staging
    other = _save_shift(tmp_path / "other" / "qwen2" / "swh", "swh_Latn", {**fingerprint, "architecture": "Qwen2"})

    monkeypatch.setenv(PRELOAD_ENV, f"{tmp_path / 'root'},{other.parent.parent}")
    with pytest.raises(FileNotFoundError, match="no intervention artifacts for this model .*1 fitted on another"):
        _preload_paths(state)
    monkeypatch.setenv(PRELOAD_ENV, str(tmp_path / "root"))
    assert _preload_paths(state) == [swahili]
    monkeypatch.setenv(PRELOAD_ENV, f"{swahili},{tmp_path / 'root'}")
    with pytest.raises(ValueError, match="two interventions for swh_Latn"):
        _preload_paths(state)
    for value in (f"{swahili},", f",{swahili}", f"{swahili},,{swahili}", ","):
        monkeypatch.setenv(PRELOAD_ENV, value)
        with pytest.raises(ValueError, match="empty entry"):
            _preload_paths(state)
    monkeypatch.delenv(PRELOAD_ENV)
    assert _preload_paths(state) == []


def _steering_runner(extra_args: dict[str, dict | None], rows: dict[str, int]):
    """A stand-in for vLLM's runner mid-prefill: request id -> extra_args, scheduled rows (prompts of 8)."""
    from types import SimpleNamespace

    from intervene_engine.worker_state import WorkerState

    order = list(rows)
    state = WorkerState("LlamaForCausalLM", "unused", 2, torch.device("cpu"), 16, 4)
    return SimpleNamespace(
        lingosteer_state=state,
        requests={rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), num_prompt_tokens=8,
                                       prompt_token_ids=[7] * 8)
                  for rid, extra in extra_args.items()},
        input_batch=SimpleNamespace(num_reqs=len(order), req_ids=order,
                                    num_computed_tokens_cpu=np.zeros(len(order), dtype=np.int64)),
        query_start_loc=SimpleNamespace(np=np.cumsum([0] + [rows[rid] for rid in order])),
    )


def test_worker_parses_each_request_once_and_forgets_it_when_it_finishes(monkeypatch):
    from intervene_engine import worker_state

    calls = []
    parse = worker_state.parse_request_args
    monkeypatch.setattr(worker_state, "parse_request_args", lambda extra: calls.append(extra) or parse(extra))
    runner = _steering_runner({"steered": {"language": "swh_Latn", "positions": "all", "lingosteer_version": "v1"},
                               "plain": None}, {"steered": 2, "plain": 3})
    state = runner.lingosteer_state
    state.store.install(_intervention("v1"))
    for _ in range(3):
        plan = state.plan_step(runner)
        assert plan.passes[0].slot[:5].tolist() == [1, 1, 0, 0, 0]
    assert len(calls) == 2  # one parse per request, not per step
    state.forget("steered")
    state.forget("plain")
    assert state.requests == {}
    state.plan_step(runner)
    assert len(calls) == 4  # a request id seen again (aborted, resubmitted) is parsed afresh


def test_worker_keeps_a_request_on_its_bound_version_and_runs_unbound_requests_plain():
    runner = _steering_runner({"bound": {"language": "swh_Latn", "positions": "all", "lingosteer_version": "v1"},
                               "unbound": {"language": "swh_Latn", "positions": "all"}}, {"bound": 2, "unbound": 2})
    state = runner.lingosteer_state
    state.store.install(_intervention("v1"))
    state.store.remove("swh_Latn")  # unloaded while the bound request runs: it keeps v1
    [step] = state.plan_step(runner).passes
    assert step.slot[:4].tolist() == [1, 1, 0, 0]
    state.store.install(_intervention("v2"))  # loaded after the unbound request arrived: it stays plain
    [step] = state.plan_step(runner).passes
    assert step.slot[:4].tolist() == [1, 1, 0, 0] and list(state.bank.slot_of) == ["v1"]


def test_worker_forgets_requests_when_vllm_drops_their_state():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from intervene_engine.plugin import register

    register()  # patches vLLM's runner, as in every vLLM process
    runner = _steering_runner({"a": None}, {"a": 1})
    runner.lingosteer_state.request("a", runner.requests["a"])
    GPUModelRunner._on_request_state_removed(runner, "a", None)
    assert runner.lingosteer_state.requests == {}


def test_engine_directory_follows_load_and_unload_answers_and_binds_each_request_once():
    from types import SimpleNamespace

    from intervene_engine.engine_directory import EngineDirectory
    from intervene_engine.request_spec import VERSION_KEY

    serving = {"alpha": 1.0, "layers": [0], "positions": "last"}
    directory = EngineDirectory([{"language": "swh_Latn", "version": "s1", "serving": serving}])
    directory.follow("lingosteer_load", {"language": "ita_Latn", "version": "i1", "serving": serving})
    directory.follow("lingosteer_load", {"language": "swh_Latn", "version": "s2", "serving": serving})  # a swap
    directory.follow("lingosteer_unload", "i1")
    assert directory.versions == {"swh_Latn": "s2"}

    def request(extra_args):
        params = SimpleNamespace(extra_args=extra_args)
        return SimpleNamespace(request_id="r", num_prompt_tokens=4, sampling_params=params)

    unbound = request({"language": "swh_Latn"})
    pinned = request({"language": "swh_Latn", VERSION_KEY: "s1"})
    unloaded = request({"language": "ita_Latn"})
    for each in (unbound, pinned, unloaded):
        directory.bind(each)
    assert unbound.sampling_params.extra_args[VERSION_KEY] == "s2"
    assert pinned.sampling_params.extra_args[VERSION_KEY] == "s1"  # bound by the server's front end: kept
    assert VERSION_KEY not in unloaded.sampling_params.extra_args  # runs plain
