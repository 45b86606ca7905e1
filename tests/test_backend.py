"""Engine defaults for this machine: float32 where the CPU would only emulate bfloat16, eager V1 runner on GPUs."""

import os
import subprocess
import sys

import pytest

from lingosteer import backend
from lingosteer.backend import cpu_has_native_bfloat16, cpu_model_name, engine_kwargs, is_cpu_backend


def test_native_bfloat16_read_from_cpu_flags(tmp_path):
    emulated = tmp_path / "emulated"
    emulated.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n")
    native = tmp_path / "native"
    native.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert not cpu_has_native_bfloat16(emulated)
    assert cpu_has_native_bfloat16(native)
    assert cpu_has_native_bfloat16(tmp_path / "missing")  # unknown: keep the model's dtype


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a given machine: `machine(cpu=..., native_bfloat16=...)`; restores vLLM's environment."""
    for name in backend.ENVIRONMENT_SETTINGS:
        monkeypatch.delenv(name, raising=False)

    def pretend(cpu: bool, native_bfloat16: bool = False) -> None:
        monkeypatch.setattr(backend, "is_cpu_backend", lambda: cpu)
        monkeypatch.setattr(backend, "cpu_has_native_bfloat16", lambda: native_bfloat16)

    return pretend


@pytest.mark.parametrize("native_bfloat16, dtype", [(False, "float32"), (True, None)])
def test_cpu_engines_run_float32_where_bfloat16_is_emulated(tmp_path, machine, native_bfloat16, dtype):
    machine(cpu=True, native_bfloat16=native_bfloat16)
    kwargs = engine_kwargs(tmp_path)
    assert kwargs.get("dtype") == dtype and "enforce_eager" not in kwargs  # CPU: torch.compile stays on
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ


def test_gpu_engines_run_eager_on_the_v1_runner(tmp_path, machine):
    """The plugin refuses CUDA graphs and the V2 runner (vllm_compat.check_runner): a GPU engine avoids both."""
    machine(cpu=False)
    kwargs = engine_kwargs(tmp_path)
    assert kwargs["enforce_eager"] is True and "dtype" not in kwargs
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_overrides_win(tmp_path, machine):
    machine(cpu=True)
    kwargs = engine_kwargs(tmp_path, max_model_len=64, dtype="bfloat16")
    assert kwargs["model"] == str(tmp_path) and kwargs["max_model_len"] == 64 and kwargs["dtype"] == "bfloat16"


@pytest.mark.parametrize("cpu", [True, False])
@pytest.mark.parametrize("api_server", [True, False])
def test_engine_settings_touch_only_the_declared_environment(tmp_path, machine, monkeypatch, cpu, api_server):
    """Tests restore `ENVIRONMENT_SETTINGS` to pretend to be a fresh machine: nothing else may change."""
    machine(cpu=cpu)
    monkeypatch.setattr(backend, "_offline_engines_in_process", True)
    before = dict(os.environ)
    engine_kwargs(tmp_path, api_server=api_server)
    changed = {name for name in set(before) | set(os.environ) if before.get(name) != os.environ.get(name)}
    assert changed and changed <= set(backend.ENVIRONMENT_SETTINGS)


def test_cpu_model_name_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t: fpu\n")
    assert cpu_model_name(cpuinfo) == "AMD EPYC 9R14 96-Core Processor"


def test_offline_engines_use_every_core_api_servers_leave_one(tmp_path, monkeypatch):
    if not is_cpu_backend():
        pytest.skip("the reserved core and the process layout are settings of vLLM's CPU backend")
    for name in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(name, raising=False)
    engine_kwargs(tmp_path, api_server=True)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ  # vLLM's default: one core for the front end
    engine_kwargs(tmp_path)
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_the_program_runs_offline_engines_in_process_servers_keep_their_processes(tmp_path, monkeypatch):
    if not is_cpu_backend():
        pytest.skip("the process layout is a setting of vLLM's CPU backend")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(backend, "_offline_engines_in_process", False)
    engine_kwargs(tmp_path)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ  # a library user or a test: vLLM's processes
    backend.run_offline_engines_in_process()  # what the `lingosteer` program does at start
    engine_kwargs(tmp_path)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    engine_kwargs(tmp_path, api_server=True)  # `lingosteer serve`, or a server the program starts
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_vllm_distribution_found_by_name_whichever_build_is_installed():
    from importlib import metadata

    import vllm

    from lingosteer.backend import alias_vllm_distribution

    alias_vllm_distribution()
    alias_vllm_distribution()  # idempotent
    assert metadata.version("vllm") == vllm.__version__.split("+")[0]


def test_the_alias_leaves_vllm_s_platform_as_it_was():
    """In a fresh process the alias comes before vLLM has chosen its platform (lm-eval's backend in
    `bench/scoring.py`'s child process): vLLM must still recognise the build it runs on."""
    probe = ("from lingosteer.backend import alias_vllm_distribution, is_cpu_backend; "
             "alias_vllm_distribution(); print(is_cpu_backend())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(is_cpu_backend())
