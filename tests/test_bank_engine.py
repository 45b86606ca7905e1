"""The bank of maps in a real engine (eager mode, tiny Llama, fp32): more languages than slots.

One plugin engine for the whole module, started with 2 device slots and 3 host copies
(LINGOSTEER_MAX_LANGUAGES / LINGOSTEER_MAX_CPU_LANGUAGES, which the worker reads when it
attaches) and 5 languages loaded, one of them pinned: a batch steers more languages than
there are slots, and a sequence of requests cycles through every language, so slots are
evicted and maps released to disk are read again. Every steered output must still equal
the HF reference of its own map, and plain requests plain vLLM's output.

Every test runs twice: with the op's eager path (steered rows grouped by slot), and with its
graph-safe path (LINGOSTEER_GRAPH_SAFE=1: every row times every slot, bench/graph_safety.py).
"""

import pytest
import torch

from lingosteer.backend import engine_kwargs, shutdown_engine
from plugin_support import hf_reference_logprobs, run_plain_vllm, summarize, write_planted_intervention

ENGINE = dict(dtype="float32", max_model_len=128, enforce_eager=True, max_num_batched_tokens=64, seed=0)
SAMPLING = dict(max_tokens=4, temperature=0.0, logprobs=1)
BANK_ENV = {"LINGOSTEER_MAX_LANGUAGES": "2", "LINGOSTEER_MAX_CPU_LANGUAGES": "3"}
LANGUAGES = ("swh_Latn", "ita_Latn", "fra_Latn", "deu_Latn", "yor_Latn")
PINNED = "swh_Latn"
TEXTS = ("Habari ya leo ni", "Oggi il tempo è", "The weather today is", "Kila mwaka wakulima", "Scientists have")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("bank-interventions")
    return {language: write_planted_intervention(root / language, model_dir, [0, 1], language, seed=seed)
            for seed, language in enumerate(LANGUAGES, start=10)}


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "graph-safe"])
def llm(request, model_dir, artifacts):
    from vllm import LLM

    with pytest.MonkeyPatch.context() as env:  # seen by the worker, in-process or a child started here
        for name, value in BANK_ENV.items():
            env.setenv(name, value)
        env.setenv("LINGOSTEER_GRAPH_SAFE", "1" if request.param else "0")
        engine = LLM(**engine_kwargs(model_dir, **ENGINE))
    for language, path in artifacts.items():
        engine.collective_rpc("lingosteer_load", args=(str(path),), kwargs={"pin": language == PINNED})
    yield engine
    shutdown_engine(engine)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def bank(llm) -> dict:
    return llm.collective_rpc("lingosteer_status")[0]["bank"]


def generate(llm, prompts, languages):
    """One batch; `languages[i]` steers prompt i on every position (None: plain)."""
    from vllm import SamplingParams

    params = [SamplingParams(**SAMPLING, extra_args=None if language is None else
                             {"language": language, "positions": "all"}) for language in languages]
    return [summarize(out) for out in llm.generate(prompts, params, use_tqdm=False)]


def assert_matches_reference(steered, prompt, hf_model, artifact):
    reference = hf_reference_logprobs(hf_model, prompt["prompt_token_ids"], steered["tokens"], artifact, mode="all")
    assert max(abs(a - b) for a, b in zip(steered["logprobs"], reference)) < 1e-4


def test_the_worker_has_the_configured_bank(llm, request):
    status = bank(llm)
    assert (status["max_languages"], status["max_cpu_languages"]) == (2, 3)
    assert status["graph_safe"] == request.node.callspec.params["llm"]
    assert len(status["resident"]) <= 2 and len(status["on_host"]) == 3  # 5 loaded, 2 released to disk


def test_requests_cycling_through_every_language(llm, tokenizer, hf_model, artifacts):
    prompt = {"prompt_token_ids": tokenizer(TEXTS[0])["input_ids"]}
    before = bank(llm)
    pinned_version = next(entry["version"] for entry in llm.collective_rpc("lingosteer_list")[0]
                          if entry["language"] == PINNED)
    outputs = {}
    for language in LANGUAGES * 2:
        [steered] = generate(llm, [prompt], [language])
        assert_matches_reference(steered, prompt, hf_model, artifacts[language])
        outputs.setdefault(language, steered)
        assert steered == outputs[language]  # the same map after its slot was evicted and refilled
        status = bank(llm)
        assert pinned_version in status["resident"] and len(status["resident"]) <= 2
    after = bank(llm)
    assert after["evictions"] > before["evictions"]
    assert after["loads_on_demand"] > before["loads_on_demand"]
    assert len({tuple(output["logprobs"]) for output in outputs.values()}) == len(LANGUAGES)  # each its own map


def test_a_batch_steering_more_languages_than_slots(llm, tokenizer, hf_model, artifacts, model_dir):
    prompts = [{"prompt_token_ids": tokenizer(text)["input_ids"]} for text in TEXTS]
    plain_prompts = [{"prompt_token_ids": tokenizer(text + " sasa")["input_ids"]} for text in TEXTS[:2]]
    overflows = bank(llm)["overflows"]
    outputs = generate(llm, prompts + plain_prompts, list(LANGUAGES) + [None, None])
    for language, prompt, steered in zip(LANGUAGES, prompts, outputs):
        assert_matches_reference(steered, prompt, hf_model, artifacts[language])
    assert outputs[len(LANGUAGES):] == run_plain_vllm(model_dir, plain_prompts, ENGINE, SAMPLING)
    assert bank(llm)["overflows"] > overflows  # 5 maps, 2 slots: some steps read host copies


def test_the_host_cache_is_bounded_again_once_a_wide_batch_ends(llm, tokenizer):
    prompts = [{"prompt_token_ids": tokenizer(text)["input_ids"]} for text in TEXTS]
    generate(llm, prompts, list(LANGUAGES))  # 5 maps in use at once: all 5 on the host, past the cap of 3
    # The worker forgets finished requests at the start of the next step, and that step trims the host.
    generate(llm, prompts[:1], [None])
    assert len(bank(llm)["on_host"]) <= 3
