"""The plugin refuses a vLLM, or a vLLM configuration, it cannot steer, with an error saying why."""

from types import SimpleNamespace

import pytest
import vllm
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from intervene_engine.vllm_compat import UnsupportedVllmError, check_runner, check_version, check_vllm, require


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


def test_missing_patched_method_is_named(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.32.9")
    monkeypatch.delattr(GPUModelRunner, "_model_forward")
    with pytest.raises(UnsupportedVllmError) as error:
        check_vllm()
    assert str(error.value) == "vLLM 0.32.9 lacks GPUModelRunner._model_forward; lingosteer supports vLLM 0.32.*"


def test_missing_module_function_is_named(monkeypatch):
    from vllm.v1.core import kv_cache_utils

    monkeypatch.delattr(kv_cache_utils, "hash_block_tokens")
    with pytest.raises(UnsupportedVllmError, match=r"lacks vllm\.v1\.core\.kv_cache_utils\.hash_block_tokens;"):
        check_vllm()


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


def config(cudagraph_mode: CUDAGraphMode, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> SimpleNamespace:
    parallel = SimpleNamespace(tensor_parallel_size=tensor_parallel, pipeline_parallel_size=pipeline_parallel,
                               world_size=tensor_parallel * pipeline_parallel)
    return SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=cudagraph_mode), parallel_config=parallel)


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


@pytest.mark.parametrize("tensor_parallel, pipeline_parallel", [(2, 1), (4, 1), (1, 2)])
def test_several_workers_are_refused_naming_the_sizes(tensor_parallel, pipeline_parallel):
    with pytest.raises(UnsupportedVllmError, match=rf"has {tensor_parallel * pipeline_parallel} "
                       rf"\(tensor_parallel_size={tensor_parallel}, pipeline_parallel_size={pipeline_parallel}\).*"
                       r"--tensor-parallel-size 1"):
        check_runner(V1Runner(), config(CUDAGraphMode.NONE, tensor_parallel, pipeline_parallel))


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
    engine_args = EngineArgs(**engine_kwargs(tiny_model_dir("llama"), enforce_eager=True, tensor_parallel_size=2))
    with pytest.raises(UnsupportedVllmError, match="tensor_parallel_size=2"):
        check_runner(V1Runner(), engine_args.create_engine_config())
