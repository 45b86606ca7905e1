"""The plugin refuses a vLLM, or a vLLM configuration, it cannot steer, with an error saying why."""

from types import SimpleNamespace

import pytest
import vllm
from vllm.config.compilation import CompilationMode, CUDAGraphMode
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from intervene_engine.vllm_compat import (
    PATCHES, UnsupportedVllmError, check_runner, check_version, check_vllm, locate, patches_in, require,
)


def test_installed_vllm_has_every_name_the_plugin_patches():
    check_vllm()  # fails here, not mid-request, when the pinned vLLM changes


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3", "0.32.0+cpu", "0.32.1.dev4+g1234"])
def test_supported_versions_pass(version):
    check_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.32.0", "0.3.2", "0.320.0"])
def test_other_versions_are_refused_naming_the_supported_ones(version, monkeypatch):
    monkeypatch.setattr(vllm, "__version__", version)
    with pytest.raises(UnsupportedVllmError, match=rf"vLLM {version} is not supported.*vLLM 0\.32\.\*"):
        check_vllm()


def _without(monkeypatch, owner, name: str) -> None:
    """Remove `name` from `owner` (module or class: where it is defined, or a dataclass field) for one test."""
    fields = getattr(owner, "__dataclass_fields__", {})
    if name in fields:
        monkeypatch.setattr(owner, "__dataclass_fields__", {key: f for key, f in fields.items() if key != name})
    for holder in getattr(owner, "__mro__", (owner,)):
        if name in vars(holder):
            monkeypatch.delattr(holder, name)
    assert not hasattr(owner, name)


@pytest.mark.parametrize("process, place, name", [
    pytest.param(patch.process, place, name, id=f"{patch.process}:{patch.attribute}:{place}.{name}")
    for patch in PATCHES for place, names in patch.required() for name in names
])
def test_every_name_of_every_patch_is_checked_and_a_missing_one_named(process, place, name, monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.32.9")
    _without(monkeypatch, locate(place), name)
    with pytest.raises(UnsupportedVllmError) as error:
        check_vllm()
    owner_name = place.partition(":")[2] or place  # a class by its name, a module by its path
    assert str(error.value) == f"vLLM 0.32.9 lacks {owner_name}.{name}; lingosteer supports vLLM 0.32.*"


def test_the_table_covers_every_process_and_the_servers_send():
    assert {patch.process for patch in PATCHES} == {"front end", "worker", "engine core", "api server"}
    [send] = patches_in("api server")
    assert (send.target, send.attribute) == ("vllm.v1.engine.core_client:AsyncMPClient", "add_request_async")


def test_register_applies_every_plugin_patch_with_its_wrapper(monkeypatch):
    """Each target is replaced by its row's wrapper around what was there (vLLM's own, stubbed here)."""
    from intervene_engine import plugin

    monkeypatch.setattr(plugin, "_registered", False)  # register() applies once per process
    rows = patches_in("front end", "worker", "engine core")
    originals = []
    for patch in rows:
        def original(*args, **kwargs):
            pass

        monkeypatch.setattr(locate(patch.target), patch.attribute, original)  # restored after the test
        originals.append(original)
    plugin.register()
    for patch, original in zip(rows, originals, strict=True):
        replacement = getattr(locate(patch.target), patch.attribute)
        assert replacement.__wrapped__ is original, patch
        assert replacement.__code__ is locate(patch.wrapper)(original).__code__, patch


def test_server_applies_its_patch_to_the_engine_client_it_holds(tmp_path):
    import asyncio

    from intervene_engine.request_spec import VERSION_KEY
    from intervene_server.registry import InterventionRegistry
    from intervene_server.schemas import InterventionInfo

    sent = []

    async def add_request_async(request):
        sent.append(request)

    engine = SimpleNamespace(engine_core=SimpleNamespace(add_request_async=add_request_async))
    registry = InterventionRegistry(engine, tmp_path)
    registry.pin_versions()
    assert engine.engine_core.add_request_async.__wrapped__ is add_request_async
    registry.loaded = {"swh_Latn": InterventionInfo.model_construct(language="swh_Latn", version="v7")}
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"language": "swh_Latn"}))
    asyncio.run(engine.engine_core.add_request_async(request))
    assert sent == [request] and request.sampling_params.extra_args[VERSION_KEY] == "v7"


def test_missing_class_is_named(monkeypatch):
    from vllm.v1.engine import core

    monkeypatch.delattr(core, "EngineCore")
    with pytest.raises(UnsupportedVllmError, match=r"lacks vllm\.v1\.engine\.core\.EngineCore;"):
        check_vllm()


def test_require_sees_methods_instance_attributes_and_dataclass_fields():
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    class Dummy:
        def method(self):
            pass

    dummy = Dummy()
    dummy.attribute = 1
    require(dummy, ("method", "attribute"), "Dummy", "0.32.0")
    require(CachedRequestState, ("sampling_params",), "CachedRequestState", "0.32.0")  # a field without default
    with pytest.raises(UnsupportedVllmError, match=r"^vLLM 0\.32\.0 lacks Dummy\.other;"):
        require(dummy, ("method", "other"), "Dummy", "0.32.0")


class V1Runner(GPUModelRunner):
    """The V1 runner's class, its per-step state set by hand (no engine, no device)."""

    def __init__(self, **missing):
        batch = dict(num_reqs=0, req_ids=[], req_id_to_index={}, num_computed_tokens_cpu=None)
        runner = dict(input_batch=None, query_start_loc=None, requests={}, num_prompt_logprobs={}, device="cpu",
                      max_num_tokens=8)
        for name in missing:
            batch.pop(name, None)
            runner.pop(name, None)
        self.__dict__.update(runner)
        if "input_batch" in runner:
            self.input_batch = SimpleNamespace(**batch)


class V2Runner:
    """Stands for vllm.v1.worker.gpu.model_runner.GPUModelRunner: not a subclass of the V1 runner."""


def config(cudagraph_mode: CUDAGraphMode, tensor_parallel: int = 1, pipeline_parallel: int = 1,
           prefill_context_parallel: int = 1, mode: CompilationMode = CompilationMode.NONE) -> SimpleNamespace:
    parallel = SimpleNamespace(tensor_parallel_size=tensor_parallel, pipeline_parallel_size=pipeline_parallel,
                               prefill_context_parallel_size=prefill_context_parallel,
                               world_size=tensor_parallel * pipeline_parallel * prefill_context_parallel)
    return SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=cudagraph_mode, mode=mode),
                           parallel_config=parallel)


def test_v1_runner_without_cuda_graphs_is_accepted():
    check_runner(V1Runner(), config(CUDAGraphMode.NONE))  # CPU, or a GPU with --enforce-eager


def test_v2_runner_is_refused_naming_the_setting():
    with pytest.raises(UnsupportedVllmError, match=r"runs .*V2Runner.*set VLLM_USE_V2_MODEL_RUNNER=0"):
        check_runner(V2Runner(), config(CUDAGraphMode.NONE))


@pytest.mark.parametrize("mode", [
    CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.FULL_AND_PIECEWISE,
])
def test_cuda_graphs_are_refused_naming_enforce_eager(mode):
    with pytest.raises(UnsupportedVllmError, match=rf"cudagraph_mode={mode.name}\).*--enforce-eager"):
        check_runner(V1Runner(), config(mode))


@pytest.mark.parametrize("tensor_parallel, pipeline_parallel, mode", [
    (2, 1, CompilationMode.NONE), (4, 1, CompilationMode.NONE), (2, 2, CompilationMode.DYNAMO_TRACE_ONCE),
    (1, 2, CompilationMode.DYNAMO_TRACE_ONCE),
])
def test_tensor_and_compiled_pipeline_parallel_workers_are_accepted(tensor_parallel, pipeline_parallel, mode):
    check_runner(V1Runner(), config(CUDAGraphMode.NONE, tensor_parallel, pipeline_parallel, mode=mode))


def test_eager_pipeline_parallel_on_cpu_is_refused_naming_what_to_set(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)
    with pytest.raises(UnsupportedVllmError, match=r"pipeline parallelism eagerly on CPU \(pipeline_parallel_size=2, "
                       r".*without --enforce-eager.*--pipeline-parallel-size 1"):
        check_runner(V1Runner(), config(CUDAGraphMode.NONE, pipeline_parallel=2))
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)  # vLLM's GPU runner allocates them eagerly too
    check_runner(V1Runner(), config(CUDAGraphMode.NONE, pipeline_parallel=2))


def test_prefill_context_parallel_is_refused_naming_the_size():
    with pytest.raises(UnsupportedVllmError, match=r"prefill_context_parallel_size=2\).*"
                       r"--prefill-context-parallel-size 1"):
        check_runner(V1Runner(), config(CUDAGraphMode.NONE, tensor_parallel=2, prefill_context_parallel=2))


@pytest.mark.parametrize("missing, named", [
    ("query_start_loc", "GPUModelRunner.query_start_loc"),
    ("input_batch", "GPUModelRunner.input_batch"),
    ("num_computed_tokens_cpu", "InputBatch.num_computed_tokens_cpu"),
])
def test_runner_state_read_every_step_is_checked_at_attach(missing, named):
    with pytest.raises(UnsupportedVllmError, match=rf"lacks {named};"):
        check_runner(V1Runner(**{missing: True}), config(CUDAGraphMode.NONE))


def test_cpu_engine_config_passes_the_runner_check(tiny_model_dir):
    """vLLM's own resolution on this machine: CPU engines (eager or compiled) never use CUDA graphs."""
    from vllm.engine.arg_utils import EngineArgs

    from lingosteer.backend import engine_kwargs, is_cpu_backend

    if not is_cpu_backend():
        pytest.skip("the CPU platform's configuration")
    for enforce_eager in (True, False):
        engine_args = EngineArgs(**engine_kwargs(tiny_model_dir("llama"), enforce_eager=enforce_eager))
        vllm_config = engine_args.create_engine_config()
        assert not vllm_config.use_v2_model_runner
        check_runner(V1Runner(), vllm_config)
    def parallel(**kwargs):
        return EngineArgs(**engine_kwargs(tiny_model_dir("llama"), **kwargs)).create_engine_config()

    check_runner(V1Runner(), parallel(enforce_eager=True, tensor_parallel_size=2))
    check_runner(V1Runner(), parallel(enforce_eager=False, pipeline_parallel_size=2))
    with pytest.raises(UnsupportedVllmError, match="pipeline parallelism eagerly on CPU"):
        check_runner(V1Runner(), parallel(enforce_eager=True, pipeline_parallel_size=2))
