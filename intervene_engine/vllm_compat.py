"""The vLLM that the plugin's patches were written for, checked before they are applied.

The plugin (and the API server) wrap private methods of vLLM 0.32 and read private
attributes of its engine core and V1 model runner: `PATCHES` lists each wrapper, where
it runs and what it relies on, and both the patching and `check_vllm` read it. Another
vLLM may rename any of them, and the plugin must then stop the engine at start-up with
an error naming what is missing, not raise an AttributeError mid-request, nor leave a
wrapper that is never called (requests would run plain while their responses say "applied").

The same holds for configurations of the right vLLM in which the steering op would
not run on every step: the V2 model runner (vLLM's default on GPUs) never calls
the wrapped `_model_forward`, and vLLM's CUDA-graph capture of the (graph-safe) op is not yet
proven on a GPU (docs/gpu-plan.md).
An engine over several workers is steered when tensor or pipeline parallel: every
worker holds every map and steers the residual stream of the layers it runs, and the
engine core checks that all workers answer each load alike (`worker_rpc`). Prefill
context parallelism (a request's tokens split over workers) is refused, and so is, on
CPU, pipeline parallelism in eager mode, which vLLM 0.32 itself cannot run.
`check_runner` refuses these when the worker attaches.

vLLM is imported inside the functions: vLLM's plugin loader logs and skips a plugin
whose module fails to import, and a skipped plugin is the silent no-op this module
exists to prevent.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Literal

SUPPORTED_VERSIONS = "0.32.*"
_SUPPORTED_MAJOR_MINOR = ["0", "32"]

# vLLM loads the plugin in the front end, the engine core and the worker; the API server
# (the front end's process under `vllm serve`) patches the engine client it holds.
Process = Literal["front end", "worker", "engine core", "api server"]


@dataclass(frozen=True)
class Patch:
    """One vLLM attribute that lingosteer replaces by a wrapper of it, and what else of vLLM the wrapper reads.

    Places are written "module" or "module:name" (like entry points): wrappers are named, not
    imported, so this module imports neither torch nor the HTTP server.
    """

    process: Process
    target: str  # "module:Class" whose attribute is replaced
    attribute: str
    wrapper: str  # "module:function" or "module:Class.method": wrapper(*context, original) returns the replacement
    private_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # place -> names the wrapper reads

    def required(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(place, names) pairs this patch needs from vLLM, the patched attribute first."""
        yield self.target, (self.attribute,)
        yield from self.private_names.items()

    def apply(self, owner: object | None = None, *context: object) -> None:
        """Replace the attribute on the target class, or on `owner` (an instance the caller holds)."""
        owner = locate(self.target) if owner is None else owner
        wrap: Callable = locate(self.wrapper)
        setattr(owner, self.attribute, wrap(*context, getattr(owner, self.attribute)))


_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_ENGINE_CORE = "vllm.v1.engine.core:EngineCore"
_REQUEST_STATE = "vllm.v1.worker.gpu_input_batch:CachedRequestState"

# Every patch lingosteer applies: the plugin's (`plugin.register`) and the API server's.
PATCHES: tuple[Patch, ...] = (
    # Reject malformed intervention arguments with a clear error before the request reaches the engine.
    Patch("front end", "vllm.v1.engine.input_processor:InputProcessor", "process_inputs",
          "intervene_engine.plugin:validate_inputs"),
    # Refuse a runner or CUDA-graph mode in which the op would not run (`check_runner`); after the model
    # loads (before torch.compile traces it), route each decoder layer's output through the steering op.
    Patch("worker", "vllm.v1.worker.gpu_worker:Worker", "load_model", "intervene_engine.plugin:attach_after_load",
          {_RUNNER: ("get_model",)}),
    # Build the step's plan for the op, parsing each request's arguments on its first step (worker_state).
    Patch("worker", _RUNNER, "_model_forward", "intervene_engine.plugin:plan_each_step", {
        _REQUEST_STATE: ("sampling_params", "prompt_token_ids"),
        "vllm.v1.utils:CpuGpuBuffer": ("copy_to_gpu",),  # and its cpu, np attributes (step_plan.StepBuffers)
    }),
    # Drop a finished request's parsed arguments (kept by request id from its first step on).
    Patch("worker", _RUNNER, "_on_request_state_removed", "intervene_engine.plugin:forget_removed_requests"),
    # Logits and log-probabilities only for the prompt rows a scoring request reads (`prompt_logits`).
    Patch("worker", _RUNNER, "_get_prompt_logprobs_dict", "intervene_engine.plugin:score_read_rows_only",
          {_REQUEST_STATE: ("sampling_params", "prompt_token_ids", "num_computed_tokens")}),
    # Bind each steered request to the intervention version current when it enters the scheduler, and salt
    # its prefix-cache block hashes from its first steered position on, so KV blocks are shared only where
    # they equal the plain run's (`prefix_cache.BlockSalter`).
    Patch("engine core", _ENGINE_CORE, "add_request", "intervene_engine.plugin:bind_added_requests", {
        "vllm.v1.request:Request": ("update_block_hashes",),
        "vllm.v1.core.kv_cache_utils": (
            "generate_block_hash_extra_keys", "hash_block_tokens", "resolve_kv_cache_block_sizes",
        ),
        "vllm.utils.hashing": ("get_hash_fn_by_name",),
    }),
    # After a load/unload, apply its answer to the language -> version directory and release versions no
    # request names any more.
    Patch("engine core", _ENGINE_CORE, "collective_rpc", "intervene_engine.plugin:follow_loads"),
    # Bind each steered request to the version current when the server sends it, waiting while a swap is in
    # flight (`registry.InterventionRegistry`); applied to `AsyncLLM.engine_core`, an AsyncMPClient.
    Patch("api server", "vllm.v1.engine.core_client:AsyncMPClient", "add_request_async",
          "intervene_server.registry:InterventionRegistry.pinned_send",
          {"vllm.v1.engine:EngineCoreRequest": ("sampling_params",)}),
)

# Set in the V1 runner's __init__ and read at attach or on every step (worker_state, prompt_logits).
RUNNER_ATTRIBUTES = ("input_batch", "query_start_loc", "requests", "num_prompt_logprobs", "device", "max_num_tokens")
INPUT_BATCH_ATTRIBUTES = ("num_reqs", "req_ids", "req_id_to_index", "num_computed_tokens_cpu")
# Set in EngineCore.__init__ and read by the engine directory (plugin._engine_directory).
ENGINE_CORE_ATTRIBUTES = ("scheduler", "request_block_hasher", "vllm_config")
# Set in Request.__init__ and replaced by prefix_cache.BlockSalter.
REQUEST_ATTRIBUTES = ("_block_hasher", "block_hashes")


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM, or the way it was started, is one the plugin cannot steer."""


def patches_in(*processes: Process) -> tuple[Patch, ...]:
    return tuple(patch for patch in PATCHES if patch.process in processes)


def locate(place: str) -> object:
    """The module, or the object in it, that "module" or "module:name[.name...]" names."""
    module_name, _, path = place.partition(":")
    found = import_module(module_name)
    for name in path.split(".") if path else ():
        found = getattr(found, name)
    return found


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
    """The installed vLLM's version and every name each of PATCHES needs; call before patching anything."""
    version = installed_version() if version is None else version
    check_version(version)
    for patch in PATCHES:
        for place, names in patch.required():
            try:
                owner = locate(place)
            except (ImportError, AttributeError):
                raise UnsupportedVllmError(
                    f"vLLM {version} lacks {place.replace(':', '.')}; lingosteer supports vLLM {SUPPORTED_VERSIONS}"
                ) from None
            require(owner, names, place.partition(":")[2] or place, version)


def check_parallelism(vllm_config) -> None:
    """Refuse the ways of splitting a model over workers that lingosteer does not steer, saying what to set.

    Tensor parallelism is steered: a decoder layer's attention and MLP end in row-parallel layers that
    all-reduce, so the (hidden_states, residual) a layer returns are the whole residual stream on every rank,
    and each rank, holding every map, steers its copy alike. So is pipeline parallelism: each stage routes its
    own layers (`model.layers[start_layer:end_layer]`) through the op, before the stream travels on."""
    from vllm.config.compilation import CompilationMode
    from vllm.platforms import current_platform

    parallel = vllm_config.parallel_config
    if parallel.prefill_context_parallel_size > 1:
        raise UnsupportedVllmError(
            f"lingosteer does not steer prefill context parallelism (prefill_context_parallel_size="
            f"{parallel.prefill_context_parallel_size}): it splits a request's tokens over the workers, and "
            "lingosteer plans the rows to steer from the whole batch; start vLLM with "
            "--prefill-context-parallel-size 1 (tensor and pipeline parallelism are supported), or VLLM_PLUGINS='' "
            "to run vLLM without lingosteer"
        )
    if (parallel.pipeline_parallel_size > 1 and current_platform.is_cpu()
            and vllm_config.compilation_config.mode == CompilationMode.NONE):
        raise UnsupportedVllmError(
            f"vLLM {installed_version()} cannot run pipeline parallelism eagerly on CPU (pipeline_parallel_size="
            f"{parallel.pipeline_parallel_size}, compilation mode NONE): its CPU worker allocates a later stage's "
            "input buffers only in the compile warm-up, which an eager engine skips, so the first step fails. "
            "Start vLLM without --enforce-eager (lingosteer steers compiled CPU engines), or with "
            "--pipeline-parallel-size 1 (tensor parallelism runs eagerly)"
        )


def check_runner(runner: object, vllm_config) -> None:
    """Refuse a worker in which the steering op would not run on every step, saying what to set."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    check_parallelism(vllm_config)
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
            f"lingosteer does not yet steer inside CUDA graphs (cudagraph_mode={cudagraph_mode}): its op is graph "
            "safe on CPU (docs/gpu-plan.md), but capturing it in vLLM's graphs is not proven on a GPU, and a graph "
            "captured without it would serve steered requests plain; start vLLM with --enforce-eager "
            "(LLM(enforce_eager=True)), or VLLM_PLUGINS='' to run vLLM without lingosteer"
        )
    require(runner, RUNNER_ATTRIBUTES, "GPUModelRunner")
    require(runner.input_batch, INPUT_BATCH_ATTRIBUTES, "InputBatch")
