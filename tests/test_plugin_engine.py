"""The vLLM plugin in a real engine (eager mode, tiny Llama, fp32): correctness.

One plugin engine for the whole module; the plain-vLLM baseline runs the same
requests in a separate process with VLLM_PLUGINS="".
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lingosteer.backend import engine_kwargs, shutdown_engine
from plugin_support import hf_reference_logprobs, run_plain_vllm, summarize, write_planted_intervention

# Small batched-token budget: prompts longer than 48 tokens are prefilled in
# chunks, so "last prompt token" lands in a later step than the prompt's start.
ENGINE = dict(
    dtype="float32", max_model_len=256, enforce_eager=True, enable_chunked_prefill=True,
    max_num_batched_tokens=48, enable_prefix_caching=True, seed=0,
)
SAMPLING = dict(max_tokens=8, temperature=0.0, logprobs=1, prompt_logprobs=1)
LONG_TEXT = (
    "Habari ya asubuhi. Leo tunazungumza kuhusu elimu, afya na maisha ya kila siku katika "
    "vijiji vya pwani ya Afrika Mashariki, ambapo watu wengi hufanya kazi za uvuvi na kilimo."
)


@pytest.fixture(scope="module")
def interventions(tmp_path_factory, model_dir, tiny_model_dir):
    root = tmp_path_factory.mktemp("interventions")
    return {
        "swh": write_planted_intervention(root / "swh", model_dir, [0, 1], "swh_Latn", seed=1),
        "ita": write_planted_intervention(root / "ita", model_dir, [1], "ita_Latn", seed=2, default_alpha=0.7),
        "swh_v2": write_planted_intervention(root / "swh_v2", model_dir, [0, 1], "swh_Latn", seed=3),
        "qwen2": write_planted_intervention(root / "qwen2", tiny_model_dir("qwen2"), [0], "swh_Latn", seed=4),
        "root": root,
    }


@pytest.fixture(scope="module")
def llm(model_dir, interventions):
    from vllm import LLM

    engine = LLM(**engine_kwargs(model_dir, **ENGINE))
    for name in ("swh", "ita"):
        engine.collective_rpc("lingosteer_load", args=(str(interventions[name]),))
    yield engine
    shutdown_engine(engine)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def token_prompt(tokenizer, text):
    return {"prompt_token_ids": tokenizer(text)["input_ids"]}


def generate(llm, prompts, extra_args_per_prompt):
    from vllm import SamplingParams

    params = [SamplingParams(**SAMPLING, extra_args=extra) for extra in extra_args_per_prompt]
    return [summarize(out) for out in llm.generate(prompts, params, use_tqdm=False)]


def test_plugin_is_installed_and_serves_llama(llm):
    status = llm.collective_rpc("lingosteer_status")[0]
    assert status["architecture"] == "LlamaForCausalLM"
    assert set(status["current"]) == {"swh_Latn", "ita_Latn"}


def test_unsteered_requests_bitwise_equal_plain_vllm(llm, tokenizer, model_dir):
    texts = ["The weather today is", "Habari ya leo ni", "Oggi il tempo è", LONG_TEXT]
    prompts = [token_prompt(tokenizer, t) for t in texts]
    mixed = generate(llm, prompts, [None, {"language": "swh_Latn", "positions": "all"}, None,
                                    {"language": "ita_Latn", "alpha": -0.5, "positions": "prompt"}])
    plain = run_plain_vllm(model_dir, prompts, ENGINE, SAMPLING)
    for i in (0, 2):
        assert mixed[i] == plain[i], f"unsteered request {i} differs from plain vLLM"
    # The steered ones really changed, so the comparison above is not vacuous.
    for i in (1, 3):
        assert mixed[i]["logprobs"] != plain[i]["logprobs"]


@pytest.mark.parametrize("positions", ["last", "prompt", "all", [[1, 4], [20, 40]]],
                         ids=["last", "prompt", "all", "ranges"])
@pytest.mark.parametrize("text", ["Habari ya leo ni nzuri sana", LONG_TEXT], ids=["short", "chunked"])
def test_steered_matches_hf_reference(llm, tokenizer, hf_model, interventions, positions, text):
    prompt = token_prompt(tokenizer, text)
    [steered] = generate(llm, [prompt], [{"language": "swh_Latn", "positions": positions, "alpha": 0.8}])
    reference = hf_reference_logprobs(hf_model, prompt["prompt_token_ids"], steered["tokens"],
                                      interventions["swh"], mode=positions, alpha=0.8)
    unsteered = hf_reference_logprobs(hf_model, prompt["prompt_token_ids"], steered["tokens"])
    assert max(abs(a - b) for a, b in zip(steered["logprobs"], reference)) < 1e-4
    assert max(abs(a - b) for a, b in zip(steered["logprobs"], unsteered)) > 1e-3


def test_request_alone_equals_request_in_mixed_batch(llm, tokenizer):
    target = token_prompt(tokenizer, "Habari ya asubuhi, rafiki yangu")
    extra = {"language": "swh_Latn", "positions": "prompt", "alpha": 1.2}
    [alone] = generate(llm, [target], [extra])
    others = [token_prompt(tokenizer, t) for t in ("Buongiorno a tutti", LONG_TEXT, "Hello there")]
    batch = generate(llm, [others[0], target, others[1], others[2]],
                     [{"language": "ita_Latn"}, extra, None, {"language": "swh_Latn", "alpha": -1.0}])
    assert batch[1]["tokens"] == alone["tokens"]
    assert max(abs(a - b) for a, b in zip(batch[1]["logprobs"], alone["logprobs"])) < 1e-5


def test_prefix_cache_never_shared_between_plain_and_steered(llm, tokenizer, hf_model, interventions):
    prompt = token_prompt(tokenizer, LONG_TEXT + " Tunaanza sasa.")
    llm.reset_prefix_cache()
    [plain_first] = generate(llm, [prompt], [None])  # fills the cache with plain KV blocks
    [steered] = generate(llm, [prompt], [{"language": "swh_Latn", "positions": "prompt"}])
    [plain_again] = generate(llm, [prompt], [None])
    reference = hf_reference_logprobs(hf_model, prompt["prompt_token_ids"], steered["tokens"],
                                      interventions["swh"], mode="prompt")
    assert max(abs(a - b) for a, b in zip(steered["logprobs"], reference)) < 1e-4
    assert plain_again == plain_first


def test_swap_replaces_version_and_unload_restores_plain(llm, tokenizer, interventions):
    prompt = token_prompt(tokenizer, "Habari ya leo ni")
    extra = {"language": "swh_Latn", "positions": "all"}
    [before] = generate(llm, [prompt], [extra])
    info = llm.collective_rpc("lingosteer_load", args=(str(interventions["swh_v2"]),))[0]
    try:
        [after] = generate(llm, [prompt], [extra])
        assert after["logprobs"] != before["logprobs"]
        status = llm.collective_rpc("lingosteer_status")[0]
        assert status["current"]["swh_Latn"] == info["version"]
        assert len(status["versions_held"]) == 2  # the old swh version was released
    finally:
        llm.collective_rpc("lingosteer_load", args=(str(interventions["swh"]),))
    [restored] = generate(llm, [prompt], [extra])
    assert restored == before


def _corrupt_copy(source, destination, edit_manifest=None, edit_tensors=None):
    shutil.copytree(source, destination)
    manifest = json.loads((destination / "manifest.json").read_text())
    if edit_manifest:
        edit_manifest(manifest)
        (destination / "manifest.json").write_text(json.dumps(manifest))
    if edit_tensors:
        tensors = load_file(destination / "matrices.safetensors")
        edited = {name: tensor.contiguous() for name, tensor in edit_tensors(tensors).items()}
        save_file(edited, destination / "matrices.safetensors")
    return destination


@pytest.mark.parametrize("case", ["other_model", "hidden_size", "layer_count", "fingerprint"])
def test_bad_intervention_refused_and_engine_keeps_serving(llm, tokenizer, interventions, case, tmp_path):
    good = interventions["swh"]
    bad = {
        "other_model": lambda: interventions["qwen2"],
        "hidden_size": lambda: _corrupt_copy(
            good, tmp_path / "bad", edit_tensors=lambda t: {k: v[..., :64] if k.startswith("b.") else v[:64, :64]
                                                             for k, v in t.items()}),
        "layer_count": lambda: _corrupt_copy(
            good, tmp_path / "bad", edit_manifest=lambda m: m.update(layers=[0, 7]),
            edit_tensors=lambda t: {k.replace(".1", ".7"): v for k, v in t.items()}),
        "fingerprint": lambda: _corrupt_copy(
            good, tmp_path / "bad", edit_manifest=lambda m: m["model"].update(tokenizer_sha256="0" * 64)),
    }[case]()
    current = llm.collective_rpc("lingosteer_status")[0]["current"]
    prompt = token_prompt(tokenizer, "Habari ya leo ni")
    [before] = generate(llm, [prompt], [{"language": "swh_Latn"}])
    with pytest.raises(Exception, match="(?i)different model|hidden_size|shape|layers"):
        llm.collective_rpc("lingosteer_load", args=(str(bad),))
    assert llm.collective_rpc("lingosteer_status")[0]["current"] == current
    [after] = generate(llm, [prompt], [{"language": "swh_Latn"}])
    assert after == before
