"""vLLM general plugin: wires lingosteer into the engine core and the worker.

`register()` runs in every vLLM process (front end, engine core, worker). It first
checks the vLLM version and every private name below (`vllm_compat`), then patches
these places:

worker   `Worker.load_model`: refuse a runner or CUDA-graph mode in which the op would
         not run (`vllm_compat.check_runner`); after the model loads (before
         torch.compile traces it), route each decoder layer's output through the
         steering op.
         `GPUModelRunner._model_forward`: build the step's plan for the op.
         `GPUModelRunner._on_request_state_removed`: drop a finished request's
         parsed arguments (kept by request id from its first step on).
         `GPUModelRunner._get_prompt_logprobs_dict`: logits and log-probabilities
         only for the prompt rows a scoring request reads (`prompt_logits`).
         `Worker.lingosteer_*`: RPC methods to load / unload / list interventions.
engine   `EngineCore.add_request`: bind each steered request to the intervention
core     version current when it enters the scheduler, and salt its prefix-cache
         block hashes from its first steered position on, so KV blocks are shared
         only where they equal the plain run's.
         `EngineCore.collective_rpc`: after a load/unload, apply its answer to the
         language -> version directory and release versions no request names any more.
front    `InputProcessor.process_inputs`: reject malformed intervention arguments
end      with a clear error before the request reaches the engine.
"""

import functools
import logging

logger = logging.getLogger("lingosteer.plugin")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from intervene_engine.vllm_compat import check_vllm

    check_vllm()
    import intervene_engine.residual_op  # noqa: F401  (registers torch.ops.lingosteer)

    _patch_front_end()
    _patch_worker()
    _patch_engine_core()


def _patch_front_end() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    from intervene_engine.request_spec import parse_request_args

    process_inputs = InputProcessor.process_inputs

    @functools.wraps(process_inputs)
    def process_validated_inputs(self, request_id, prompt, params, *args, **kwargs):
        parse_request_args(getattr(params, "extra_args", None))  # RequestSpecError is a ValueError
        return process_inputs(self, request_id, prompt, params, *args, **kwargs)

    InputProcessor.process_inputs = process_validated_inputs


def _patch_worker() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from intervene_engine import worker_rpc
    from intervene_engine.prompt_logits import prompt_logprobs_of_scored_rows
    from intervene_engine.residual_op import active_plan
    from intervene_engine.vllm_compat import check_runner
    from intervene_engine.worker_state import attach_to_model

    load_model = Worker.load_model

    @functools.wraps(load_model)
    def load_model_then_attach(self, *args, **kwargs):
        check_runner(self.model_runner, self.vllm_config)  # before the weights load: fail fast
        load_model(self, *args, **kwargs)
        runner = self.model_runner
        model_config = self.vllm_config.model_config
        runner.lingosteer_state = attach_to_model(
            runner.get_model(), model_config.model, runner.device, runner.max_num_tokens,
            getattr(model_config.hf_text_config, "bos_token_id", None),
        )

    model_forward = GPUModelRunner._model_forward

    @functools.wraps(model_forward)
    def model_forward_with_plan(self, *args, **kwargs):
        state = getattr(self, "lingosteer_state", None)
        plan = state.plan_step(self) if state is not None else None
        with active_plan(plan):
            return model_forward(self, *args, **kwargs)

    on_request_state_removed = GPUModelRunner._on_request_state_removed

    @functools.wraps(on_request_state_removed)
    def forget_removed_request(self, req_id, req_state):
        state = getattr(self, "lingosteer_state", None)
        if state is not None:
            state.forget(req_id)
        return on_request_state_removed(self, req_id, req_state)

    get_prompt_logprobs_dict = GPUModelRunner._get_prompt_logprobs_dict

    @functools.wraps(get_prompt_logprobs_dict)
    def get_prompt_logprobs_of_scored_rows(self, hidden_states, num_scheduled_tokens):
        return prompt_logprobs_of_scored_rows(self, get_prompt_logprobs_dict, hidden_states, num_scheduled_tokens)

    Worker.load_model = load_model_then_attach
    GPUModelRunner._model_forward = model_forward_with_plan
    GPUModelRunner._on_request_state_removed = forget_removed_request
    GPUModelRunner._get_prompt_logprobs_dict = get_prompt_logprobs_of_scored_rows
    worker_rpc.add_methods(Worker)


def _patch_engine_core() -> None:
    from vllm.v1.engine.core import EngineCore

    from intervene_engine.engine_directory import EngineDirectory, versions_in_use
    from intervene_engine.prefix_cache import BlockSalter
    from intervene_engine.vllm_compat import ENGINE_CORE_ATTRIBUTES, require

    add_request = EngineCore.add_request
    collective_rpc = EngineCore.collective_rpc

    # Plugins load inside EngineCore.__init__, too late to wrap it: create lazily,
    # always on the busy-loop thread (add_request and RPCs both run there).
    def directory(core) -> EngineDirectory:
        if not hasattr(core, "lingosteer_directory"):
            require(core, ENGINE_CORE_ATTRIBUTES, "EngineCore")
            core.lingosteer_directory = EngineDirectory(
                collective_rpc(core, "lingosteer_list")[0], BlockSalter.of_engine_core(core))
        return core.lingosteer_directory

    @functools.wraps(add_request)
    def add_request_bound(self, request, *args, **kwargs):
        directory(self).bind(request)
        return add_request(self, request, *args, **kwargs)

    @functools.wraps(collective_rpc)
    def collective_rpc_then_follow(self, method, *args, **kwargs):
        result = collective_rpc(self, method, *args, **kwargs)
        if isinstance(method, str) and method in ("lingosteer_load", "lingosteer_unload"):
            directory(self).follow(method, result[0])
            in_use = versions_in_use(self.scheduler.requests.values())
            collective_rpc(self, "lingosteer_release_unused", args=(in_use,))
        return result

    EngineCore.add_request = add_request_bound
    EngineCore.collective_rpc = collective_rpc_then_follow
