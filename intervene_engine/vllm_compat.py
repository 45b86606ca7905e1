"""The vLLM that the plugin's patches were written for, checked before they are applied.

The plugin wraps private methods of vLLM 0.32 and reads private attributes of its
engine core and V1 model runner. Another vLLM may rename any of them, and the
plugin must then stop the engine at start-up with an error naming what is missing,
not raise an AttributeError mid-request, nor leave a wrapper that is never called
(requests would run plain while their responses say "applied").

The same holds for configurations of the right vLLM in which the steering op would
not run on every step: the V2 model runner (vLLM's default on GPUs) never calls
the wrapped `_model_forward`, and a replayed CUDA graph skips the op's Python.
Nor does the plugin run one engine over several workers (tensor or pipeline
parallel): interventions are loaded, listed and bound through one worker's answers.
`check_runner` refuses all three when the worker attaches.

vLLM is imported inside the functions: vLLM's plugin loader logs and skips a plugin
whose module fails to import, and a skipped plugin is the silent no-op this module
exists to prevent.
"""

from importlib import import_module

SUPPORTED_VERSIONS = "0.32.*"
_SUPPORTED_MAJOR_MINOR = ["0", "32"]

# What the plugin wraps or calls ("module:Class" or a module -> names), see plugin.py.
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    "vllm.v1.engine.input_processor:InputProcessor": ("process_inputs",),
    "vllm.v1.worker.gpu_worker:Worker": ("load_model",),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner": (
        "_model_forward", "_on_request_state_removed", "_get_prompt_logprobs_dict", "get_model",
    ),
    "vllm.v1.worker.gpu_input_batch:CachedRequestState": ("sampling_params", "prompt_token_ids", "num_computed_tokens"),
    "vllm.v1.engine.core:EngineCore": ("add_request", "collective_rpc"),
    "vllm.v1.request:Request": ("update_block_hashes",),
    "vllm.v1.core.kv_cache_utils": (
        "generate_block_hash_extra_keys", "hash_block_tokens", "resolve_kv_cache_block_sizes",
    ),
    "vllm.utils.hashing": ("get_hash_fn_by_name",),
    "vllm.v1.utils:CpuGpuBuffer": ("copy_to_gpu",),  # and its cpu, np attributes (step_plan.StepBuffers)
}
# Set in the V1 runner's __init__ and read at attach or on every step (worker_state, prompt_logits).
RUNNER_ATTRIBUTES = ("input_batch", "query_start_loc", "requests", "num_prompt_logprobs", "device", "max_num_tokens")
INPUT_BATCH_ATTRIBUTES = ("num_reqs", "req_ids", "req_id_to_index", "num_computed_tokens_cpu")
# Set in EngineCore.__init__ and read by the engine directory (plugin._patch_engine_core).
ENGINE_CORE_ATTRIBUTES = ("scheduler", "request_block_hasher", "vllm_config")
# Set in Request.__init__ and replaced by prefix_cache.BlockSalter.
REQUEST_ATTRIBUTES = ("_block_hasher", "block_hashes")


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM, or the way it was started, is one the plugin cannot steer."""


def installed_version() -> str:
    import vllm

    return vllm.__version__


def check_version(version: str) -> None:
    if version.split(".")[:2] != _SUPPORTED_MAJOR_MINOR:
        raise UnsupportedVllmError(
            f"vLLM {version} is not supported: lingosteer patches vLLM internals and supports vLLM {SUPPORTED_VERSIONS}"
        )


def require(owner: object, names: tuple[str, ...], owner_name: str, version: str | None = None) -> None:
    """Raise naming the first of `names` that `owner` (a class, module or instance) lacks."""
    fields = getattr(owner, "__dataclass_fields__", {})  # a dataclass's fields without defaults
    for name in names:
        if not hasattr(owner, name) and name not in fields:
            raise UnsupportedVllmError(
                f"vLLM {version or installed_version()} lacks {owner_name}.{name}; "
                f"lingosteer supports vLLM {SUPPORTED_VERSIONS}"
            )


def check_vllm(version: str | None = None) -> None:
    """The installed vLLM's version and every name in PRIVATE_NAMES; call before patching anything."""
    version = installed_version() if version is None else version
    check_version(version)
    for location, names in PRIVATE_NAMES.items():
        module_name, _, class_name = location.partition(":")
        try:
            owner = import_module(module_name)
            owner = getattr(owner, class_name) if class_name else owner
        except (ImportError, AttributeError):
            raise UnsupportedVllmError(
                f"vLLM {version} lacks {location.replace(':', '.')}; lingosteer supports vLLM {SUPPORTED_VERSIONS}"
            ) from None
        require(owner, names, class_name or module_name, version)


def check_runner(runner: object, vllm_config) -> None:
    """Refuse a worker in which the steering op would not run on every step, saying what to set."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    parallel = vllm_config.parallel_config
    if parallel.world_size > 1:
        raise UnsupportedVllmError(
            f"lingosteer steers engines with one worker, but this one has {parallel.world_size} "
            f"(tensor_parallel_size={parallel.tensor_parallel_size}, "
            f"pipeline_parallel_size={parallel.pipeline_parallel_size}): its interventions are loaded and listed "
            "through one worker's answers. Start vLLM with --tensor-parallel-size 1 --pipeline-parallel-size 1 "
            "(for more throughput, run several such servers), or VLLM_PLUGINS='' to run vLLM without lingosteer"
        )
    if not isinstance(runner, GPUModelRunner):
        runner_class = type(runner)
        raise UnsupportedVllmError(
            f"lingosteer steers through vLLM's V1 model runner, but this worker runs "
            f"{runner_class.__module__}.{runner_class.__qualname__} (on GPUs vLLM {SUPPORTED_VERSIONS} defaults to "
            "its V2 runner): set VLLM_USE_V2_MODEL_RUNNER=0, or VLLM_PLUGINS='' to run vLLM without lingosteer"
        )
    cudagraph_mode = vllm_config.compilation_config.cudagraph_mode
    if cudagraph_mode != CUDAGraphMode.NONE:
        raise UnsupportedVllmError(
            f"lingosteer cannot steer inside CUDA graphs (cudagraph_mode={cudagraph_mode}): a replayed graph "
            "skips the steering op, so steered requests would run plain; start vLLM with --enforce-eager "
            "(LLM(enforce_eager=True)), or VLLM_PLUGINS='' to run vLLM without lingosteer"
        )
    require(runner, RUNNER_ATTRIBUTES, "GPUModelRunner")
    require(runner.input_batch, INPUT_BATCH_ATTRIBUTES, "InputBatch")
