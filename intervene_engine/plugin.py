"""vLLM general plugin: wires lingosteer into the front end, the engine core and the worker.

`register()` runs in every vLLM process (front end, engine core, worker). It first
checks the vLLM version and every private name the patches rely on (`vllm_compat`),
then applies the patches that `vllm_compat.PATCHES` lists for these processes (each
row says what its wrapper, defined here, does), and adds `Worker.lingosteer_*`, the
RPC methods that load / unload / list interventions (`worker_rpc`).
"""

import functools
import logging
from collections.abc import Callable

from intervene_engine.request_spec import parse_request_args
from intervene_engine.vllm_compat import ENGINE_CORE_ATTRIBUTES, check_runner, check_vllm, patches_in, require
from intervene_engine.worker_rpc import ERROR_KEY, WorkerRpcError, WorkersDisagreeError, agreed_answer, failed

logger = logging.getLogger("lingosteer.plugin")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    check_vllm()  # before anything below imports vLLM's private modules
    from vllm.v1.worker.gpu_worker import Worker

    # local: these import vLLM's private modules, which check_vllm() must vet first (vLLM's plugin
    # loader imports this module before register() runs)
    import intervene_engine.residual_op  # noqa: F401  (registers torch.ops.lingosteer)
    from intervene_engine import worker_rpc

    for patch in patches_in("front end", "worker", "engine core"):
        patch.apply()
    worker_rpc.add_methods(Worker)


def validate_inputs(process_inputs: Callable) -> Callable:
    @functools.wraps(process_inputs)
    def process_validated_inputs(self, request_id, prompt, params, *args, **kwargs):
        parse_request_args(getattr(params, "extra_args", None))  # RequestSpecError is a ValueError
        return process_inputs(self, request_id, prompt, params, *args, **kwargs)

    return process_validated_inputs


def attach_after_load(load_model: Callable) -> Callable:
    from intervene_engine.worker_state import attach_to_model  # local: see register()

    @functools.wraps(load_model)
    def load_model_then_attach(self, *args, **kwargs):
        check_runner(self.model_runner, self.vllm_config)  # before the weights load: fail fast
        load_model(self, *args, **kwargs)
        runner = self.model_runner
        model_config = self.vllm_config.model_config
        runner.lingosteer_state = attach_to_model(
            runner.get_model(), model_config.model, runner.device, runner.max_num_tokens,
            model_config.get_hidden_size(), model_config.dtype,
            getattr(model_config.hf_text_config, "bos_token_id", None),
        )

    return load_model_then_attach


def plan_each_step(model_forward: Callable) -> Callable:
    from intervene_engine.residual_op import active_plan  # local: see register()

    @functools.wraps(model_forward)
    def model_forward_with_plan(self, *args, **kwargs):
        state = getattr(self, "lingosteer_state", None)
        plan = state.plan_step(self) if state is not None else None
        with active_plan(plan):
            return model_forward(self, *args, **kwargs)

    return model_forward_with_plan


def forget_removed_requests(on_request_state_removed: Callable) -> Callable:
    @functools.wraps(on_request_state_removed)
    def forget_removed_request(self, req_id, req_state):
        state = getattr(self, "lingosteer_state", None)
        if state is not None:
            state.forget(req_id)
        return on_request_state_removed(self, req_id, req_state)

    return forget_removed_request


def score_read_rows_only(get_prompt_logprobs_dict: Callable) -> Callable:
    from intervene_engine.prompt_logits import prompt_logprobs_of_scored_rows  # local: see register()

    @functools.wraps(get_prompt_logprobs_dict)
    def get_prompt_logprobs_of_scored_rows(self, hidden_states, num_scheduled_tokens):
        return prompt_logprobs_of_scored_rows(self, get_prompt_logprobs_dict, hidden_states, num_scheduled_tokens)

    return get_prompt_logprobs_of_scored_rows


def bind_added_requests(add_request: Callable) -> Callable:
    @functools.wraps(add_request)
    def add_request_bound(self, request, *args, **kwargs):
        _engine_directory(self).bind(request)
        return add_request(self, request, *args, **kwargs)

    return add_request_bound


def follow_loads(collective_rpc: Callable) -> Callable:
    @functools.wraps(collective_rpc)
    def collective_rpc_then_follow(self, method, *args, **kwargs):
        if not (isinstance(method, str) and method in ("lingosteer_load", "lingosteer_unload")):
            return collective_rpc(self, method, *args, **kwargs)
        directory = _engine_directory(self)  # read before the change: what a disagreement restores
        answers = collective_rpc(self, method, *args, **kwargs)
        try:
            answer = agreed_answer(method, answers)  # WorkerRpcError: it failed on every worker, nothing changed
        except WorkersDisagreeError as disagreement:
            restored = _roll_back(self, collective_rpc, directory, method, answers, _worker_arguments(*args, **kwargs))
            _release_unused(self, collective_rpc)
            raise WorkersDisagreeError(f"{disagreement}; rolled back on every worker: {restored}") from None
        directory.follow(method, answer)
        _release_unused(self, collective_rpc)
        return answers

    return collective_rpc_then_follow


def _worker_arguments(timeout=None, args=(), kwargs=None) -> tuple[tuple, dict]:
    """The worker method's arguments, from the rest of `EngineCore.collective_rpc(method, timeout, args, kwargs)`."""
    return tuple(args), dict(kwargs or {})


def _roll_back(core, collective_rpc: Callable, directory, method: str, answers: list,
               arguments: tuple[tuple, dict]) -> str:
    """Restore, on every worker, the version each language the disagreed change touched had before it; says what."""
    if method == "lingosteer_load":  # the language is the artifact's, known from the workers that loaded it
        languages = sorted({answer["language"] for answer in answers if not failed(answer)})
    else:
        args, kwargs = arguments
        languages = [args[0] if args else kwargs["language"]]
    restored = []
    for language in languages:
        previous = directory.previous(language)
        outcomes = collective_rpc(core, "lingosteer_restore", args=(language, previous))
        broken = [f"rank {rank}: {outcome[ERROR_KEY]}" for rank, outcome in enumerate(outcomes) if failed(outcome)]
        if broken:
            raise WorkerRpcError(
                f"{method}: the workers disagreed, and restoring {language} failed on {'; '.join(broken)}: they may "
                f"now steer {language} differently; unload it (or restart the engine)")
        restored.append(f"{language} stays unloaded" if previous is None
                        else f"{language} keeps version {previous['version']}")
    return ", ".join(restored)


def _release_unused(core, collective_rpc: Callable) -> None:
    """Let every worker drop the versions neither current nor named by a request the scheduler holds."""
    from intervene_engine.engine_directory import versions_in_use  # local: see register()

    collective_rpc(core, "lingosteer_release_unused", args=(versions_in_use(core.scheduler.requests.values()),))


def _engine_directory(core):
    """The engine core's directory of versions. Plugins load inside EngineCore.__init__, too late
    to wrap it: create it lazily, always on the busy-loop thread (add_request and RPCs both run there)."""
    if not hasattr(core, "lingosteer_directory"):
        # local: see register()
        from intervene_engine.engine_directory import EngineDirectory
        from intervene_engine.prefix_cache import BlockSalter

        require(core, ENGINE_CORE_ATTRIBUTES, "EngineCore")
        # Passes through the wrapped collective_rpc, which only follows loads and unloads. Every worker holds
        # the same interventions (each preloads the same LINGOSTEER_INTERVENTIONS): agreed_answer checks it.
        loaded = agreed_answer("lingosteer_list", core.collective_rpc("lingosteer_list"))
        core.lingosteer_directory = EngineDirectory(loaded, BlockSalter.of_engine_core(core))
    return core.lingosteer_directory
