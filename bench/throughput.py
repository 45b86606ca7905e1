"""Throughput of the plugin against plain vLLM, measured side by side in one run.

Up to six engines live in this process, each started with its own environment: plain
vLLM (VLLM_PLUGINS="") and the plugin with three banks of maps (intervene_engine.bank,
sized by LINGOSTEER_* variables that the worker reads when it starts):

  plugin     the serving default bank (4 full slots), one map loaded (--intervention, or synthetic)
  bank-r64   16 slots of rank 64, 16 synthetic rank-64 maps loaded, one language each
  bank-full  16 full slots, 16 synthetic full maps loaded, one language each

Modes run interleaved, in a shuffled order per repetition, on the same batch of
concurrent requests:

  plain            plain vLLM
  idle             plugin, its map loaded, no request steered
  last             every request steered at its last prompt token, on all layers
  all              every request steered on every prompt and generated token, on all layers
  mixed-r64-last   as `last` on bank-r64, request i toward language i mod 16: one batch mixes 16 languages
  mixed-r64-all    as `all` on bank-r64, 16 languages mixed
  mixed-full-last  as `last` on bank-full, 16 languages mixed
  mixed-*-graph-safe  the three mixed modes with the op's graph-safe path (LINGOSTEER_GRAPH_SAFE=1), which
                   multiplies every row of a steered step by all 16 slots: what CUDA graphs would cost

Every request generates exactly --max-tokens tokens (EOS ignored), so the work is
the same in every mode and output tokens per second compare directly. We report
medians and the ratio of each mode's median to plain's. Only the engines the chosen
--modes need are started (plain always runs: ratios are to it).

Usage: python bench/throughput.py [--model gemma-3-270m] [--intervention DIR] [--modes idle,last,...] [--json]
Synthetic maps are random maps near identity on all layers, written to a temporary
directory: the cost does not depend on the map's values.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alignment.artifact import save_intervention
from alignment.estimator import LinearAligner
from intervene_engine.bank import BankConfig
from lingosteer.backend import cpu_model_name, engine_kwargs, is_cpu_backend, shutdown_engine
from lingosteer.fingerprint import model_fingerprint
from lingosteer.languages import all_languages
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


@dataclass(frozen=True)
class Engine:
    bank: BankConfig | None  # None: plain vLLM
    maps: int = 0  # synthetic maps loaded, one language each
    map_rank: int | None = None  # their rank (None: full)


# Started in this order. Plain first: vLLM loads plugins once per process, so the first engine's VLLM_PLUGINS
# decides for this one (the plugin's engines load it in their own processes, which start fresh).
ENGINES = {
    "plain": Engine(None),
    "plugin": Engine(BankConfig(), maps=1),
    "bank-r64": Engine(BankConfig(max_languages=16, max_cpu_languages=16, max_map_rank=64), maps=16, map_rank=64),
    "bank-full": Engine(BankConfig(max_languages=16, max_cpu_languages=16, max_map_rank=None), maps=16),
    # The same banks steered by the op's graph-safe path (every row times every slot), which CUDA graphs need.
    "bank-r64-graph-safe": Engine(BankConfig(max_languages=16, max_cpu_languages=16, max_map_rank=64,
                                             graph_safe=True), maps=16, map_rank=64),
    "bank-full-graph-safe": Engine(BankConfig(max_languages=16, max_cpu_languages=16, max_map_rank=None,
                                              graph_safe=True), maps=16),
}
# mode -> (engine, positions every request is steered at; None: no request steered)
MODES = {
    "plain": ("plain", None),
    "idle": ("plugin", None),
    "last": ("plugin", "last"),
    "all": ("plugin", "all"),
    "mixed-r64-last": ("bank-r64", "last"),
    "mixed-r64-all": ("bank-r64", "all"),
    "mixed-full-last": ("bank-full", "last"),
    "mixed-r64-last-graph-safe": ("bank-r64-graph-safe", "last"),
    "mixed-r64-all-graph-safe": ("bank-r64-graph-safe", "all"),
    "mixed-full-last-graph-safe": ("bank-full-graph-safe", "last"),
}


def parse_modes(text: str) -> list[str]:
    modes = [mode for mode in text.split(",") if mode]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    return ["plain"] + [mode for mode in MODES if mode in modes and mode != "plain"]  # table order, plain first


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="prepared model name or HF directory")
    parser.add_argument("--intervention", type=Path, help="artifact for idle/last/all (default: synthetic full map)")
    parser.add_argument("--modes", type=parse_modes, default=list(MODES),
                        help=f"comma-separated subset of {','.join(MODES)} (default: all; plain always runs)")
    parser.add_argument("--requests", type=int, default=48, help="concurrent requests per batch")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no torch.compile (engines start in ~1 min instead of ~10 on a loaded 2-core CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser.parse_args(argv)


def table_languages(count: int) -> list[str]:
    """The FLORES codes of the first `count` languages of the language table, English excepted."""
    codes = [language.flores for language in all_languages() if language.flores != "eng_Latn"][:count]
    if len(codes) < count:
        raise SystemExit(f"{count} languages asked for: the language table has {len(codes)} besides English")
    return codes


def synthetic_interventions(model_dir: Path, out_dirs: dict[str, Path], rank: int | None = None,
                            seed: int = 0) -> list[Path]:
    """A valid artifact in out_dirs[source] for each source language, on every layer, all with the same random map
    near identity (full, or of rank `rank`): the cost of serving a map does not depend on its values, and each
    artifact is a version of its own (its manifest names its language), so it takes a bank slot of its own."""
    import numpy as np

    fingerprint = model_fingerprint(model_dir)
    layers, dim = fingerprint["num_hidden_layers"], fingerprint["hidden_size"]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((layers, 2 * dim, dim)).astype(np.float32)
    Y = X + 0.05 * rng.standard_normal(X.shape).astype(np.float32)
    aligner = LinearAligner(solver="lstsq", rank=rank).fit(X, Y)
    return [save_intervention(out_dir, aligner, fingerprint=fingerprint, source=source, target="eng_Latn",
                              layers=list(range(layers)), pooling="mean", fit_data={"synthetic": True})
            for source, out_dir in out_dirs.items()]


def synthetic_intervention(model_dir: Path, out_dir: Path, source: str = "swh_Latn", seed: int = 0,
                           rank: int | None = None) -> Path:
    """One synthetic artifact (`synthetic_interventions`) in out_dir."""
    return synthetic_interventions(model_dir, {source: out_dir}, rank, seed)[0]


@contextmanager
def environment(values: dict[str, str | None]):
    """os.environ with `values` set (None: unset) inside the block, as it was after it."""
    saved = {name: os.environ.get(name) for name in values}
    set_environment(values)
    try:
        yield
    finally:
        set_environment(saved)


def set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def start_engine(model_dir: Path, bank: BankConfig | None, args, engines: int):
    """An engine whose processes see, at their start, VLLM_PLUGINS="" (bank None: plain vLLM) or the plugin's bank
    variables (read by the worker, BankConfig.from_env). On a GPU the engines share the card's memory."""
    from vllm import LLM

    env = {"VLLM_PLUGINS": ""} if bank is None else {"VLLM_PLUGINS": None, **bank.env()}
    kwargs = engine_kwargs(model_dir, max_model_len=256, max_num_seqs=64, enforce_eager=args.enforce_eager)
    if not is_cpu_backend():
        kwargs["gpu_memory_utilization"] = 0.9 / engines
    with environment(env):
        llm = LLM(**kwargs)
    if bank is not None:
        status = bank_status(llm)
        held = (status["max_languages"], status["max_cpu_languages"], status["max_map_rank"], status["graph_safe"])
        if held != (bank.max_languages, bank.max_cpu_languages, bank.max_map_rank or "full", bank.graph_safe):
            raise SystemExit(f"the worker's bank is {held}, not {bank}: the environment did not reach it")
    return llm


def bank_status(llm) -> dict:
    return llm.collective_rpc("lingosteer_status")[0]["bank"]


def bank_summary(status: dict) -> dict:
    """A bank's status with its lists of versions (resident, on_host) as counts."""
    return {key: len(value) if isinstance(value, list) else value for key, value in status.items()}


def run_batch(llm, positions: str | None, languages: list[str], args) -> float:
    """Output tokens per second for one batch, request i steered toward languages[i mod len] (positions None: plain)."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                             extra_args=None if positions is None else
                             {"language": languages[i % len(languages)], "positions": positions})
              for i in range(args.requests)]
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.requests)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == args.requests * args.max_tokens, "every request must generate max_tokens tokens"
    return tokens / elapsed


def write_maps(name: str, model_dir: Path, root: Path, args) -> list[Path]:
    """The artifacts engine `name` loads: --intervention for the plugin engine if given, else its synthetic maps."""
    spec = ENGINES[name]
    if name == "plugin" and args.intervention:
        return [args.intervention]
    codes = table_languages(spec.maps)
    return synthetic_interventions(model_dir, {code: root / name / code for code in codes}, spec.map_rank)


def device_name() -> str:
    import torch

    return cpu_model_name() if is_cpu_backend() else torch.cuda.get_device_name()


def main(argv=None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    model_dir = resolve_model(args.model)
    needed = [name for name in ENGINES if any(MODES[mode][0] == name for mode in args.modes)]
    # On CPU each engine holds ~3 GiB besides its KV cache: four at the project's 2 GiB default took ~20 of the
    # 23 GiB here. 1 GiB (41k tokens of Gemma 3 270M) is still 6x what a batch of 48 x (prompt + 48) takes.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engines, languages, report = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in needed:
            bank = ENGINES[name].bank
            artifacts = [] if bank is None else write_maps(name, model_dir, Path(tmp), args)
            log(f"throughput: starting engine {name} ({len(artifacts)} maps) on {model_dir}")
            llm = engines[name] = start_engine(model_dir, bank, args, len(needed))
            loaded = [llm.collective_rpc("lingosteer_load", args=(str(path),))[0] for path in artifacts]
            languages[name] = [info["language"] for info in loaded]
            report[name] = {"dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
                            "languages": len(loaded), "layers_steered": len(loaded[0]["layers"]) if loaded else 0}

        def run(mode: str) -> float:
            engine, positions = MODES[mode]
            return run_batch(engines[engine], positions, languages[engine], args)

        for mode in args.modes:  # warm-up: first batches pay one-time costs
            run(mode)
        samples = {mode: [] for mode in args.modes}
        order = list(args.modes)
        for repetition in range(args.repetitions):
            random.Random(repetition).shuffle(order)
            for mode in order:
                samples[mode].append(run(mode))
            log(f"  repetition {repetition + 1}/{args.repetitions}: "
                + ", ".join(f"{m} {samples[m][-1]:.1f} tok/s" for m in args.modes))
        load_end = os.getloadavg()
        for name, llm in engines.items():  # each bank as its worker held it, and what it did over the run
            report[name]["bank"] = None if ENGINES[name].bank is None else bank_summary(bank_status(llm))
            shutdown_engine(llm)

    medians = {mode: statistics.median(values) for mode, values in samples.items()}
    result = {
        "model": str(args.model),
        "device": device_name(),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "repetitions": args.repetitions,
        "enforce_eager": args.enforce_eager,
        "dtype": report["plain"]["dtype"],
        "load_average": {"start": load_start, "end": load_end},  # 1/5/15 min: before the engines, after the runs
        "engines": report,
        "modes": {mode: {"engine": engine, "positions": positions,
                         "languages_per_batch": min(args.requests, len(languages[engine])) if positions else 0}
                  for mode, (engine, positions) in MODES.items() if mode in args.modes},
        "median_tokens_per_s": medians,
        "ratios": {mode: medians[mode] / medians["plain"] for mode in args.modes if mode != "plain"},
        "samples": samples,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {args.model} on {result['device']}: {args.requests} concurrent requests x {args.max_tokens} tokens, "
          f"{args.repetitions} interleaved repetitions, {'eager' if args.enforce_eager else 'torch.compile'}, "
          f"{result['dtype']}, load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    for name, engine in report.items():
        bank = engine["bank"]
        print(f"  engine {name}: " + ("plain vLLM" if bank is None else
              f"{bank['max_languages']} slots of rank {bank['max_map_rank']} ({bank['bank_bytes'] / 2**20:.0f} MiB), "
              f"{engine['languages']} languages loaded, {engine['layers_steered']} layers steered; "
              f"{bank['evictions']} evictions, {bank['overflows']} overflows"))
    print(f"{'mode':<16} {'languages':>9} {'median tok/s':>13} {'ratio to plain':>15}")
    for mode in args.modes:
        print(f"{mode:<16} {result['modes'][mode]['languages_per_batch']:>9} {medians[mode]:>13.1f} "
              f"{medians[mode] / medians['plain']:>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
