"""Every architecture lingosteer steers, each in a real plugin engine on a tiny random checkpoint (fp32, eager).

Per architecture one plugin engine, started and shut down inside the test: a steered request (positions
"all", every decoder layer) runs in one batch with plain ones; the plain ones must equal plain vLLM
bitwise (`VLLM_PLUGINS=''`, a child process) and the steered one the HF reference, which hooks the HF
decoder layers' outputs (`alignment.hf_steering`): so the vLLM-side stream (hidden_states + residual) and
the HF hook point agree, post-norms of Gemma 2 / 3 included. The shared logic is
`plugin_support.check_architecture_on_model`, which `bench/architectures.py` reports too.
An architecture it cannot steer stops the engine at start; the real Gemma 3 270M is checked once (e2e).
"""

import pytest

import tiny_models
from intervene_engine.worker_state import SUPPORTED_ARCHITECTURES
from plugin_support import (
    ARCHITECTURE_ENGINE,
    ARCHITECTURE_SAMPLING,
    STEERED_TOLERANCE,
    STEERING_EFFECT,
    check_architecture_on_model,
    environment,
    run_plain_vllm,
)

# The real Gemma 3 270M (bf16 weights run in fp32): 18 layers of width 640 and a 262144-way softmax give larger
# differences than the tiny models'. Measured: steered 6.9e-5 (over logprobs the planted maps moved by up to
# 84), plain 9.8e-6; 1e-3 keeps a 14-fold margin.
GEMMA_TOLERANCE = 1e-3


def test_every_supported_class_has_a_tiny_model_here():
    assert sorted(tiny_models.ARCHITECTURE_CLASSES[arch] for arch in tiny_models.ARCHITECTURES) \
        == sorted(SUPPORTED_ARCHITECTURES)
    assert not {tiny_models.ARCHITECTURE_CLASSES[arch] for arch in tiny_models.UNSTEERABLE_ARCHITECTURES} \
        & set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURES)
def test_plain_requests_equal_plain_vllm_and_steered_equals_hf(arch, tiny_model_dir, tmp_path):
    result = check_architecture_on_model(tiny_model_dir(arch), tmp_path)
    print(arch, result)  # the measured differences, for `pytest -rP`
    assert result["vllm_class"] == tiny_models.ARCHITECTURE_CLASSES[arch]
    assert result["plain_identical"], "a plain request beside a steered one differs from plain vLLM"
    assert result["plain_vs_hf_max_abs_diff"] < STEERED_TOLERANCE, result  # vLLM itself runs the model as HF does
    assert result["steered_max_abs_diff"] < result["tolerance"] == STEERED_TOLERANCE, result
    assert result["steering_effect"] > STEERING_EFFECT, result  # the comparison above is not vacuous


def test_an_architecture_it_cannot_steer_stops_the_engine_at_start(tiny_model_dir, capfd):
    from vllm import LLM

    from lingosteer.backend import engine_kwargs

    model_dir = tiny_model_dir("gpt2")
    with pytest.raises(Exception) as error:
        LLM(**engine_kwargs(model_dir, **ARCHITECTURE_ENGINE))
    surfaced = str(error.value) + "".join(capfd.readouterr())
    assert ("lingosteer cannot steer GPT2LMHeadModel" in surfaced
            and "start vLLM with VLLM_PLUGINS='' to serve it without lingosteer" in surfaced), surfaced[-4000:]
    # What the message advises works: plain vLLM serves the model (its engine inside its process: faster).
    with environment(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        [plain] = run_plain_vllm(model_dir, ["Habari ya leo"], ARCHITECTURE_ENGINE, ARCHITECTURE_SAMPLING)
    assert plain["tokens"] and None not in plain["logprobs"]


@pytest.mark.e2e
def test_real_gemma_steered_request_matches_hf(gemma_model_dir, tmp_path):
    """One plugin engine on the prepared Gemma 3 270M (fp32), a planted map on three of its 18 layers."""
    result = check_architecture_on_model(gemma_model_dir, tmp_path, layers=[3, 9, 15], compare_with_plain_vllm=False)
    print(result)
    assert result["vllm_class"] == "Gemma3ForCausalLM"
    assert result["steered_max_abs_diff"] < GEMMA_TOLERANCE, result
    assert result["steering_effect"] > STEERING_EFFECT, result
