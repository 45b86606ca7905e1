"""Helpers for the plugin tests: planted interventions, plain-vLLM runs, the HF reference."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
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


def hf_reference_sequence_logprobs(hf_model, token_ids, intervention_dir=None, alpha=None) -> list[float]:
    """Log-probabilities of `token_ids[1:]` (prompt and generated tokens alike) under HF transformers (fp32),
    optionally steered with positions "all" (every position but a leading BOS): `hf_reference_logprobs` with
    the first token as the prompt, whose "all" mask is then the same one."""
    return hf_reference_logprobs(hf_model, token_ids[:1], token_ids[1:], intervention_dir, mode="all", alpha=alpha)


# ---------------------------------------------------------------------------
# One architecture end to end: tests/test_architectures.py asserts on it, bench/architectures.py reports it.

ARCHITECTURE_ENGINE = dict(dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
ARCHITECTURE_SAMPLING = dict(max_tokens=6, temperature=0.0, logprobs=1, prompt_logprobs=1)
ARCHITECTURE_TEXTS = ("The weather today is", "Habari ya leo ni nzuri sana, rafiki yangu", "Oggi il tempo è bello")
ARCHITECTURE_STEERED = 1  # the request of ARCHITECTURE_TEXTS that is steered; the others run plain beside it
ARCHITECTURE_STEER = {"language": "swh_Latn", "positions": "all", "alpha": 0.8}
# Largest |vLLM - HF| over a steered request's prompt and sampled logprobs (fp32, eager) that still counts as
# the same computation: measured at most 9.5e-7 on the seven tiny models (a few float32 ulps of a logprob near
# -8), so 1e-4 keeps a 100-fold margin and still catches a stream taken at the wrong point (differences ~0.5).
STEERED_TOLERANCE = 1e-4
# Smallest |steered - unsteered| (HF) that shows the planted maps really moved the logprobs.
STEERING_EFFECT = 1e-3


def check_architecture_on_model(model_dir: Path, work_dir: Path, layers: list[int] | None = None,
                                compare_with_plain_vllm: bool = True) -> dict:
    """Steer a model's decoder `layers` (default: all) in a plugin engine (started and shut down here), beside
    plain requests in the same batch, and compare: the plain requests with plain vLLM (a subprocess, bitwise;
    skipped unless `compare_with_plain_vllm`), the steered one with the HF reference. Returns
    `vllm_class`: the class the plugin reports; `plain_identical`: the plain requests' tokens, logprobs and
    prompt logprobs equal plain vLLM's exactly (None: not compared); `steered_max_abs_diff`: the steered
    request's largest |logprob - HF's| over its prompt and sampled tokens; `tolerance`: `STEERED_TOLERANCE`
    (for the tiny models); `plain_vs_hf_max_abs_diff`: the same for the plain requests against unsteered HF
    (vLLM itself); `steering_effect`: the steered request's largest |logprob - unsteered HF's| (the check is
    not vacuous)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from lingosteer.backend import engine_kwargs, shutdown_engine

    if layers is None:
        layers = list(range(model_fingerprint(model_dir)["num_hidden_layers"]))
    artifact = write_planted_intervention(Path(work_dir) / "swh", model_dir, layers, "swh_Latn")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [{"prompt_token_ids": tokenizer(text)["input_ids"]} for text in ARCHITECTURE_TEXTS]
    extras = [ARCHITECTURE_STEER if i == ARCHITECTURE_STEERED else None for i in range(len(prompts))]

    llm = LLM(**engine_kwargs(model_dir, **ARCHITECTURE_ENGINE))
    try:
        vllm_class = llm.collective_rpc("lingosteer_status")[0]["architecture"]
        llm.collective_rpc("lingosteer_load", args=(str(artifact),))
        params = [SamplingParams(**ARCHITECTURE_SAMPLING, extra_args=extra) for extra in extras]
        outputs = [summarize(output) for output in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        shutdown_engine(llm)
    plain = None
    if compare_with_plain_vllm:
        # The plain child runs its engine inside itself: 13 s instead of 30 for a tiny model here (no engine-core
        # and worker processes to start), the same outputs bitwise. Only the child reads the setting.
        with environment(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
            plain = run_plain_vllm(model_dir, prompts, ARCHITECTURE_ENGINE, ARCHITECTURE_SAMPLING)

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def sequence(i: int) -> tuple[list[int], list[float]]:
        """Request i's tokens after the first, and its vLLM logprobs of them (prompt, then sampled)."""
        return (prompts[i]["prompt_token_ids"][1:] + outputs[i]["tokens"],
                outputs[i]["prompt_logprobs"][1:] + outputs[i]["logprobs"])

    def max_diff(a: list[float], b: list[float]) -> float:
        assert len(a) == len(b)
        return max(abs(x - y) for x, y in zip(a, b))

    plain_vs_hf = 0.0
    for i in range(len(prompts)):
        if i == ARCHITECTURE_STEERED:
            continue
        tokens, logprobs = sequence(i)
        ids = prompts[i]["prompt_token_ids"][:1] + tokens
        plain_vs_hf = max(plain_vs_hf, max_diff(logprobs, hf_reference_sequence_logprobs(hf_model, ids)))
    tokens, logprobs = sequence(ARCHITECTURE_STEERED)
    ids = prompts[ARCHITECTURE_STEERED]["prompt_token_ids"][:1] + tokens
    steered_reference = hf_reference_sequence_logprobs(hf_model, ids, artifact, alpha=ARCHITECTURE_STEER["alpha"])
    unsteered_reference = hf_reference_sequence_logprobs(hf_model, ids)
    return {
        "vllm_class": vllm_class,
        "plain_identical": None if plain is None else all(
            outputs[i] == plain[i] for i in range(len(prompts)) if i != ARCHITECTURE_STEERED),
        "steered_max_abs_diff": max_diff(logprobs, steered_reference),
        "tolerance": STEERED_TOLERANCE,
        "plain_vs_hf_max_abs_diff": plain_vs_hf,
        "steering_effect": max_diff(logprobs, unsteered_reference),
    }


# ---------------------------------------------------------------------------
# Tensor (and pipeline) parallelism end to end: tests/test_tensor_parallel.py asserts on it,
# bench/tensor_parallel.py reports it.

TP_SIZE = 2
TP_ENGINE = dict(dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
TP_SAMPLING = dict(max_tokens=8, temperature=0.0, logprobs=1, prompt_logprobs=1)
# The same prompt steered and plain (the steering's effect), beside other plain and steered requests.
TP_TEXTS = ("Habari ya leo ni nzuri sana, rafiki yangu", "Habari ya leo ni nzuri sana, rafiki yangu",
            "The weather today is", "Oggi il tempo è bello e andiamo al mare con gli amici")
TP_STEER = {"language": "swh_Latn", "positions": "all", "alpha": 0.8}
TP_EXTRAS = (TP_STEER, None, None, {**TP_STEER, "alpha": -0.6})
# Largest |TP=2 - TP=1| (and |PP=2 - TP=1|) over every request's prompt and sampled logprobs (fp32) that counts
# as the same computation: measured 4.8e-7 on the tiny Llama and Qwen2, 9.5e-7 on the tiny Gemma 3 (steered and
# plain requests alike; plain vLLM's TP=2 differs from its TP=1 by 4.8e-7 too); the tolerance keeps a 10x margin.
TP_TOLERANCE = 1e-5


def cpu_threads_bind(ranks: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` CPU workers on this machine: the CPUs this process may use, split
    into `ranks` equal groups ("0|1" on 2 cores). vLLM's default ("auto") binds each rank to a NUMA node of its
    own and refuses more ranks than nodes."""
    cpus = sorted(os.sched_getaffinity(0))
    per_rank = len(cpus) // ranks
    if per_rank == 0:
        raise RuntimeError(f"{ranks} CPU workers need at least {ranks} CPUs; this process may use {len(cpus)}")
    return "|".join(",".join(map(str, cpus[rank * per_rank:(rank + 1) * per_rank])) for rank in range(ranks))


@contextmanager
def environment(**values: str):
    """Set environment variables for the block (vLLM's engine processes inherit them when they start)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def parallel_engine(model_dir: Path, tensor: int = 1, pipeline: int = 1, **overrides):
    """A plugin engine (TP_ENGINE) over `tensor` x `pipeline` workers: on CPU, one group of cores per worker, and
    compiled when pipeline parallel (vLLM 0.32 cannot run that eagerly on CPU: `vllm_compat.check_parallelism`)."""
    from vllm import LLM

    from lingosteer.backend import engine_kwargs, is_cpu_backend

    workers = tensor * pipeline
    bind, mode = {}, {}
    if is_cpu_backend() and workers > 1:
        bind = {"VLLM_CPU_OMP_THREADS_BIND": cpu_threads_bind(workers)}
    if is_cpu_backend() and pipeline > 1:
        mode = {"enforce_eager": False}
    kwargs = {**TP_ENGINE, **mode, "tensor_parallel_size": tensor, "pipeline_parallel_size": pipeline, **overrides}
    with environment(**bind):
        return LLM(**engine_kwargs(model_dir, **kwargs))


def check_tensor_parallel_on_model(model_dir: Path, work_dir: Path, size: int = TP_SIZE,
                                   pipeline: bool = False) -> dict:
    """Steer the same batch (planted maps on every decoder layer, positions "all", steered beside plain requests)
    in a `size`-way tensor-parallel plugin engine, a `size`-stage pipeline-parallel one if `pipeline`, and a
    one-worker one (each started and shut down in turn), and follow loads, a swap, a refused load and an unload
    through every rank of the tensor-parallel engine. Returns `size`; `tokens_identical`: every request sampled
    the same tokens at TP=size as at TP=1; `max_abs_diff_tp1`: the largest |logprob(TP=size) - logprob(TP=1)|
    over every request's prompt and sampled tokens; `tolerance`: TP_TOLERANCE; `steering_effect`: the largest
    |steered - plain| over the prompt run both ways (TP=1: the comparison is not vacuous); `ranks`: what each rank
    of the tensor-parallel engine answered (`rank_answers`); with `pipeline`, `pipeline`: `tokens_identical`,
    `max_abs_diff_tp1` and `loaded` (each stage's current versions after the load) of the pipeline engine."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from lingosteer.backend import shutdown_engine

    work_dir = Path(work_dir)
    layers = list(range(model_fingerprint(model_dir)["num_hidden_layers"]))
    first = write_planted_intervention(work_dir / "swh", model_dir, layers, "swh_Latn", seed=1)
    second = write_planted_intervention(work_dir / "swh_v2", model_dir, layers, "swh_Latn", seed=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [{"prompt_token_ids": tokenizer(text)["input_ids"]} for text in TP_TEXTS]
    params = [SamplingParams(**TP_SAMPLING, extra_args=extra) for extra in TP_EXTRAS]

    engines = {"tensor": dict(tensor=size), "single": {}}
    if pipeline:
        engines["pipeline"] = dict(pipeline=size)
    outputs, answers = {}, {}
    for name, layout in engines.items():
        llm = parallel_engine(model_dir, **layout)
        try:
            llm.collective_rpc("lingosteer_load", args=(str(first),))
            outputs[name] = [summarize(output) for output in llm.generate(prompts, params, use_tqdm=False)]
            if name == "tensor":
                answers[name] = rank_answers(llm, second, work_dir / "missing")
            elif name == "pipeline":
                answers[name] = [status["current"] for status in llm.collective_rpc("lingosteer_status")]
        finally:
            shutdown_engine(llm)

    def logprobs(output: dict) -> list[float]:
        return [value for value in output["prompt_logprobs"] + output["logprobs"] if value is not None]

    def compared(name: str) -> dict:
        pairs = list(zip(outputs[name], outputs["single"], strict=True))
        same = [(a, b) for a, b in pairs if a["tokens"] == b["tokens"]]
        return {
            "tokens_identical": len(same) == len(pairs),
            "max_abs_diff_tp1": max(max(abs(x - y) for x, y in zip(logprobs(a), logprobs(b), strict=True))
                                    for a, b in same) if same else float("inf"),
        }

    single = outputs["single"]
    result = {
        "size": size,
        **compared("tensor"),
        "tolerance": TP_TOLERANCE,
        "steering_effect": max(abs(x - y) for x, y in zip(logprobs(single[0]), logprobs(single[1]))),
        "ranks": answers["tensor"],
    }
    if pipeline:
        result["pipeline"] = {**compared("pipeline"), "loaded": answers["pipeline"]}
    return result


def rank_answers(llm, replacement: Path, missing: Path) -> dict:
    """Through an engine whose swh_Latn was just loaded: each rank's current versions and versions held
    (`lingosteer_status`) after that load, after a swap to `replacement`, after a refused load of `missing` (with
    the error it raised) and after an unload, and each rank's answer to the swap and the unload."""

    def current() -> list[dict]:
        return [{"current": status["current"], "versions_held": status["versions_held"]}
                for status in llm.collective_rpc("lingosteer_status")]

    answers = {"loaded": current()}
    answers["swap_answers"] = [answer["version"] for answer in
                               llm.collective_rpc("lingosteer_load", args=(str(replacement),))]
    answers["swapped"] = current()
    try:
        llm.collective_rpc("lingosteer_load", args=(str(missing),))
        answers["refused_error"] = None
    except Exception as error:  # vLLM relays the engine core's error as a plain Exception
        answers["refused_error"] = str(error)
    answers["after_refused"] = current()
    answers["unload_answers"] = llm.collective_rpc("lingosteer_unload", args=("swh_Latn",))
    answers["unloaded"] = current()
    return answers
