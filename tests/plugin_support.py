"""Helpers for the plugin tests: planted interventions, plain-vLLM runs, the HF reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from alignment.artifact import Evidence, load_intervention, save_intervention
from alignment.estimator import LinearAligner
from alignment.hf_steering import steered
from lingosteer.fingerprint import model_fingerprint

PLAIN_RUNNER = Path(__file__).with_name("plain_vllm_runner.py")
RESULT_MARKER = "LINGOSTEER_RESULT "  # vLLM logs to stdout too


def write_planted_intervention(
    out_dir: Path, model_dir: Path, layers: list[int], source: str, seed: int = 0,
    strength: float = 0.5, default_alpha: float = 1.0, fit_data: dict | None = None,
) -> Path:
    """Fit (exactly, by lstsq) an artifact whose maps are a known random perturbation of I."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dim = config.get("text_config", config)["hidden_size"]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((len(layers), 4 * dim, dim))
    maps = np.eye(dim) + strength * rng.standard_normal((len(layers), dim, dim)) / np.sqrt(dim)
    bias = 0.1 * rng.standard_normal((len(layers), 1, dim))
    Y = np.einsum("lnd,led->lne", X, maps) + bias
    aligner = LinearAligner(solver="lstsq", bias=True).fit(X, Y)
    return save_intervention(
        out_dir, aligner, fingerprint=model_fingerprint(model_dir), source=source, target="eng_Latn",
        layers=layers, pooling="mean", fit_data={"planted": True, "seed": seed, **(fit_data or {})},
        alpha=default_alpha, overwrite=True,
    )


def planted_evidence(**fields) -> Evidence:
    """Calibration evidence as `align build` records it, with `fields` planted and the rest filler."""
    filler = dict(task="xcopa", file="val.sw.jsonl", items=100, plain_accuracy=0.5, cross_validated_accuracy=0.5,
                  delta=0.0, delta_ci95=[-0.05, 0.05], adopted=False, fold_choices=[], candidate_accuracy={},
                  rule="planted", date="today", engine={}, summary="planted")
    return Evidence(**{**filler, **fields})


def run_plain_vllm(model_dir: Path, prompts: list, engine: dict, sampling: dict) -> list[dict]:
    """The same requests through vLLM with every plugin disabled, in a separate process."""
    env = {**os.environ, "VLLM_PLUGINS": ""}
    job = json.dumps({"model": str(model_dir), "prompts": prompts, "engine": engine, "sampling": sampling})
    done = subprocess.run(
        [sys.executable, str(PLAIN_RUNNER)], input=job, env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"plain vLLM run failed:\n{done.stderr[-4000:]}")
    [result] = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    return json.loads(result[len(RESULT_MARKER):])


def summarize(output) -> dict:
    """Tokens, sampled-token logprobs and prompt logprobs of one vLLM RequestOutput."""
    completion = output.outputs[0]
    prompt_logprobs = [
        None if entry is None else entry[token].logprob
        for entry, token in zip(output.prompt_logprobs or [], output.prompt_token_ids)
    ]
    return {
        "tokens": list(completion.token_ids),
        "logprobs": [entry[token].logprob for entry, token in zip(completion.logprobs, completion.token_ids)],
        "prompt_logprobs": prompt_logprobs,
    }


def steered_positions(mode, prompt_len: int, total_len: int, first_steerable: int = 0) -> torch.Tensor:
    """The [1, total_len] mask of positions the plugin steers for a position mode
    (`first_steerable` 1: the prompt starts with BOS, which "prompt" and "all" leave alone)."""
    mask = torch.zeros(1, total_len, dtype=torch.bool)
    if mode == "last":
        mask[0, prompt_len - 1] = True
    elif mode == "prompt":
        mask[0, first_steerable:prompt_len] = True
    elif mode == "all":
        mask[0, first_steerable:] = True
    else:
        for start, end in mode:
            mask[0, start:min(end, prompt_len)] = True
    return mask


def hf_reference_logprobs(hf_model, prompt_ids, generated_ids, intervention_dir=None, mode="last", alpha=None):
    """Log-probabilities of the generated tokens under HF transformers (fp32), optionally steered."""
    ids = torch.tensor([list(prompt_ids) + list(generated_ids)])
    with torch.no_grad():
        if intervention_dir is None:
            logits = hf_model(ids).logits
        else:
            intervention = load_intervention(intervention_dir)
            starts_with_bos = len(prompt_ids) > 0 and prompt_ids[0] == hf_model.config.bos_token_id
            mask = steered_positions(mode, len(prompt_ids), ids.shape[1], int(starts_with_bos))
            with steered(hf_model, intervention, mask, alpha=alpha):
                logits = hf_model(ids).logits
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    start = len(prompt_ids) - 1
    return [logprobs[start + i, token].item() for i, token in enumerate(generated_ids)]
