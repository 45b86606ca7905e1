"""Throughput of the plugin against plain vLLM, measured side by side in one run.

Two engines live in this process: one started with VLLM_PLUGINS="" (plain vLLM)
and one with the plugin. Modes run interleaved, in a shuffled order per
repetition, on the same batch of concurrent requests:

  plain  plain vLLM
  idle   plugin installed and an intervention loaded, no request steered
  last   every request steered at its last prompt token, on all layers
  all    every request steered on every prompt and generated token, on all layers

Every request generates exactly --max-tokens tokens (EOS ignored), so the work is
the same in every mode and output tokens per second compare directly. We report
medians and the ratio of each mode's median to plain's.

Usage: python bench/throughput.py [--model gemma-3-270m] [--intervention DIR] [--json]
Without --intervention, a synthetic full-rank map (all layers) is written to a
temporary directory: the cost does not depend on the map's values.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from alignment.artifact import save_intervention
from alignment.estimator import LinearAligner
from lingosteer.backend import engine_kwargs, shutdown_engine
from lingosteer.fingerprint import model_fingerprint
from lingosteer.models import resolve_model

PROMPTS = [
    "Habari ya asubuhi. Leo tutazungumza kuhusu",
    "The history of the city begins in the year",
    "Oggi il mercato del paese è pieno di",
    "Kila mwaka wakulima hupanda mahindi na",
    "In the morning the children walk to school and",
    "La ricetta tradizionale richiede farina, uova e",
    "Serikali imetangaza mpango mpya wa elimu ambao",
    "Scientists have found a new species of bird that",
]
MODES = ("plain", "idle", "last", "all")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="prepared model name or HF directory")
    parser.add_argument("--intervention", type=Path, help="artifact directory (default: synthetic map)")
    parser.add_argument("--requests", type=int, default=48, help="concurrent requests per batch")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no torch.compile (engines start in ~1 min instead of ~10 on a loaded 2-core CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser.parse_args(argv)


def synthetic_intervention(model_dir: Path, out_dir: Path, source: str = "swh_Latn", seed: int = 0,
                           rank: int | None = None) -> Path:
    """A valid artifact on every layer with a random map near identity (full, or of rank `rank`)."""
    import numpy as np

    fingerprint = model_fingerprint(model_dir)
    layers, dim = fingerprint["num_hidden_layers"], fingerprint["hidden_size"]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((layers, 2 * dim, dim)).astype(np.float32)
    Y = X + 0.05 * rng.standard_normal(X.shape).astype(np.float32)
    aligner = LinearAligner(solver="lstsq", rank=rank).fit(X, Y)
    return save_intervention(
        out_dir, aligner, fingerprint=fingerprint, source=source, target="eng_Latn",
        layers=list(range(layers)), pooling="mean", fit_data={"synthetic": True},
    )


def start_engine(model_dir: Path, plugins: bool, enforce_eager: bool):
    """An engine whose processes see VLLM_PLUGINS as set here at their start."""
    from vllm import LLM

    previous = os.environ.pop("VLLM_PLUGINS", None)
    if not plugins:
        os.environ["VLLM_PLUGINS"] = ""
    try:
        return LLM(**engine_kwargs(model_dir, max_model_len=256, max_num_seqs=64, enforce_eager=enforce_eager))
    finally:
        os.environ.pop("VLLM_PLUGINS", None)
        if previous is not None:
            os.environ["VLLM_PLUGINS"] = previous


def run_batch(llm, mode: str, args, language: str) -> float:
    """Output tokens per second for one batch in one mode."""
    from vllm import SamplingParams

    extra = {"last": {"language": language, "positions": "last"},
             "all": {"language": language, "positions": "all"}}.get(mode)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.requests)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == args.requests * args.max_tokens, "every request must generate max_tokens tokens"
    return tokens / elapsed


def main(argv=None) -> int:
    args = parse_args(argv)

    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        intervention = args.intervention or synthetic_intervention(model_dir, Path(tmp) / "synthetic")
        log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
        log(f"throughput: starting plain and plugin engines on {model_dir}")
        plain = start_engine(model_dir, plugins=False, enforce_eager=args.enforce_eager)
        steered = start_engine(model_dir, plugins=True, enforce_eager=args.enforce_eager)
        info = steered.collective_rpc("lingosteer_load", args=(str(intervention),))[0]
        engines = {"plain": plain, "idle": steered, "last": steered, "all": steered}
        dtype = str(plain.llm_engine.model_config.dtype).removeprefix("torch.")
        for mode in MODES:  # warm-up: first batches pay one-time costs
            run_batch(engines[mode], mode, args, info["language"])
        samples = {mode: [] for mode in MODES}
        order = list(MODES)
        for repetition in range(args.repetitions):
            random.Random(repetition).shuffle(order)
            for mode in order:
                samples[mode].append(run_batch(engines[mode], mode, args, info["language"]))
            log(f"  repetition {repetition + 1}/{args.repetitions}: "
                + ", ".join(f"{m} {samples[m][-1]:.1f} tok/s" for m in MODES))
        shutdown_engine(steered)
        shutdown_engine(plain)

    medians = {mode: statistics.median(values) for mode, values in samples.items()}
    result = {
        "model": str(args.model),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "repetitions": args.repetitions,
        "enforce_eager": args.enforce_eager,
        "dtype": dtype,
        "layers_steered": len(info["layers"]),
        "median_tokens_per_s": medians,
        "ratios": {mode: medians[mode] / medians["plain"] for mode in MODES if mode != "plain"},
        "samples": samples,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {args.model}: {args.requests} concurrent requests x {args.max_tokens} tokens, "
              f"{args.repetitions} interleaved repetitions, {len(info['layers'])} layers steered, "
              f"{'eager' if args.enforce_eager else 'torch.compile'}, {dtype}")
        print(f"{'mode':<6} {'median tok/s':>13} {'ratio to plain':>15}")
        for mode in MODES:
            print(f"{mode:<6} {medians[mode]:>13.1f} {medians[mode] / medians['plain']:>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
