"""The tiny random test models: deterministic, loadable by transformers, servable by vLLM."""

import pytest

import tiny_models
from lingosteer.backend import engine_kwargs, shutdown_engine

ARCHITECTURE_CLASSES = tiny_models.ARCHITECTURE_CLASSES
# Plain vLLM against transformers' greedy tokens here, one engine each, for the first three architectures only:
# test_architectures.py checks all of them (these again) through the plugin engine, whose plain requests equal
# plain vLLM's bitwise and HF's logprobs within 1e-4, and plain vLLM on GPT-2; more engines here would only add time.
VLLM_CHECKED_HERE = ("llama", "qwen2", "gemma3")
PROMPTS = ["The capital of France is", "Habari ya asubuhi", "La capitale d'Italia è", "今天天气很好"]


def test_tokenizer_adds_bos_and_round_trips(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    for text in PROMPTS:
        ids = tokenizer(text).input_ids
        assert ids[0] == tiny_models.BOS_ID
        assert tiny_models.BOS_ID not in ids[1:]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Trained on these languages: a sentence takes far fewer tokens than its UTF-8 bytes.
    swahili = "Habari ya asubuhi, rafiki yangu. Leo ni siku nzuri sana."
    assert len(tokenizer(swahili).input_ids) < len(swahili.encode()) / 2


def test_same_parameters_give_identical_files(tmp_path, data_dir):
    first = tiny_models.build_tiny_model("qwen2", tmp_path / "a", data_dir=data_dir)
    second = tiny_models.build_tiny_model("qwen2", tmp_path / "b", data_dir=data_dir)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_seed_and_dtype_change_the_weights(tmp_path, data_dir):
    from safetensors.torch import load_file

    base = load_file(tiny_models.build_tiny_model("llama", tmp_path / "base", data_dir=data_dir) / "model.safetensors")
    reseeded = load_file(
        tiny_models.build_tiny_model("llama", tmp_path / "seed", seed=1, data_dir=data_dir) / "model.safetensors"
    )
    bf16 = load_file(
        tiny_models.build_tiny_model("llama", tmp_path / "bf16", dtype="bfloat16", data_dir=data_dir)
        / "model.safetensors"
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not base[name].equal(reseeded[name])
    assert bf16[name].dtype.is_floating_point and str(bf16[name].dtype) == "torch.bfloat16"
    assert base[name].to(bf16[name].dtype).equal(bf16[name])


@pytest.mark.parametrize("arch", list(ARCHITECTURE_CLASSES))
def test_transformers_loads_each_architecture(tiny_model_dir, arch):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_model_dir(arch)
    config = AutoConfig.from_pretrained(path)
    assert config.hidden_size <= 256 and 2 <= config.num_hidden_layers <= 4
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert type(model).__name__ == config.architectures[0] == ARCHITECTURE_CLASSES[arch]


def _hf_greedy(path, prompts, max_tokens):
    """Greedy continuations from the transformers implementation, the reference for vLLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    continuations = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            continuations.append(out[0, ids.shape[1] :].tolist())
    return continuations


def test_vllm_loads_and_generates_with_each_architecture(tiny_model_dir, monkeypatch):
    """vLLM serves each tiny model and its greedy tokens equal the transformers reference.

    One engine at a time: start, generate, shut down, then the next architecture.
    Plain vLLM (no plugins): this checks the model files, not our serving plugin.
    float32 explicitly: with dtype "auto" vLLM on CPU downcasts float32 to bfloat16.
    """
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_PLUGINS", "")

    max_tokens = 6
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for arch in VLLM_CHECKED_HERE:
        path = tiny_model_dir(arch)
        expected = _hf_greedy(path, PROMPTS, max_tokens)
        llm = LLM(**engine_kwargs(path, dtype="float32", enforce_eager=True))
        try:
            outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        finally:
            shutdown_engine(llm)
        for output, reference in zip(outputs, expected):
            assert output.prompt_token_ids[0] == tiny_models.BOS_ID
            assert list(output.outputs[0].token_ids) == reference, (arch, output.prompt)
