"""The plugin under torch.compile (vLLM's CPU default), for every supported architecture.

The trap this guards against: a plain Python hook is traced once while idle and
baked into the compiled graph as a no-op, so steering silently does nothing. The
plain engine runs first and fills the same compile cache the plugin engines then
start from, so a cached plain graph would be caught too.
"""

import os

import pytest
import torch
from vllm import SamplingParams

from intervene_engine.worker_state import SUPPORTED_ARCHITECTURES
from lingosteer.backend import engine_kwargs, shutdown_engine
from plugin_support import hf_reference_logprobs, run_plain_vllm, summarize, write_planted_intervention

COMPILED = dict(dtype="float32", max_model_len=256, seed=0)  # enforce_eager off: compiled
SAMPLING = dict(max_tokens=6, temperature=0.0, logprobs=1)
TEXTS = ["Habari ya leo ni nzuri sana", "The weather today is", "Oggi il tempo è bello"]
STEER = {"language": "swh_Latn", "positions": "all", "alpha": 0.8}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    previous = os.environ.get("VLLM_CACHE_ROOT")
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))
    yield
    if previous is None:
        del os.environ["VLLM_CACHE_ROOT"]
    else:
        os.environ["VLLM_CACHE_ROOT"] = previous


def token_prompts(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [{"prompt_token_ids": tokenizer(t)["input_ids"]} for t in TEXTS]


@pytest.fixture(scope="module")
def plain_llama(compile_cache, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    return run_plain_vllm(model_dir, token_prompts(model_dir), COMPILED, SAMPLING)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def compiled(request, plain_llama, tiny_model_dir, tmp_path_factory):
    """One compiled plugin engine at a time, with an intervention on every layer."""
    from vllm import LLM

    from lingosteer.fingerprint import model_fingerprint

    arch = request.param
    model_dir = tiny_model_dir(arch)
    layers = list(range(model_fingerprint(model_dir)["num_hidden_layers"]))
    artifact = write_planted_intervention(tmp_path_factory.mktemp(arch) / "swh", model_dir, layers, "swh_Latn")
    llm = LLM(**engine_kwargs(model_dir, **COMPILED))
    llm.collective_rpc("lingosteer_load", args=(str(artifact),))
    yield arch, llm, model_dir, artifact
    shutdown_engine(llm)


def generate(llm, prompts, extra_args_per_prompt):
    params = [SamplingParams(**SAMPLING, extra_args=extra) for extra in extra_args_per_prompt]
    return [summarize(out) for out in llm.generate(prompts, params, use_tqdm=False)]


def test_compiled_engine_really_steers_and_matches_hf(compiled, plain_llama):
    from transformers import AutoModelForCausalLM

    arch, llm, model_dir, artifact = compiled
    assert llm.collective_rpc("lingosteer_status")[0]["architecture"] in SUPPORTED_ARCHITECTURES
    prompts = token_prompts(model_dir)
    steered = generate(llm, prompts, [STEER] * len(prompts))
    unsteered = generate(llm, prompts, [None] * len(prompts))
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, out, plain in zip(prompts, steered, unsteered):
        reference = hf_reference_logprobs(hf_model, prompt["prompt_token_ids"], out["tokens"], artifact,
                                          mode="all", alpha=STEER["alpha"])
        assert max(abs(a - b) for a, b in zip(out["logprobs"], reference)) < 1e-3, arch
        unsteered_reference = hf_reference_logprobs(hf_model, prompt["prompt_token_ids"], plain["tokens"])
        assert max(abs(a - b) for a, b in zip(plain["logprobs"], unsteered_reference)) < 1e-3, arch
    changed = [out["logprobs"] != plain["logprobs"] for out, plain in zip(steered, unsteered)]
    assert all(changed), f"{arch}: steering was a no-op under torch.compile"
    if arch == "llama":  # the plain compiled baseline costs an engine start: Llama only
        mixed = generate(llm, prompts, [None, STEER, None])
        assert [mixed[0]["tokens"], mixed[2]["tokens"]] == [plain_llama[0]["tokens"], plain_llama[2]["tokens"]]
