"""Capacity of the bank of maps: many languages, few device slots, requests cycling through them.

One plugin engine with a bank of --slots device slots and --max-cpu-languages host copies
(`intervene_engine.bank`), --languages languages loaded (a synthetic map each, on every
layer), then --requests requests one after the other, request i steered (every position)
toward language i mod --languages. Each request is classed by what the bank had to do for
it, read from the worker's status before and after it:

  resident        its map was in a slot already
  swap_in         its map was copied from the host into a slot
  load_on_demand  its map had been released to disk and was read again

and we report the count and p50 / p99 latency of each class, the bank's evictions, copies
into slots, overflows and loads on demand over the run, and the errors (a request that
raised, or did not generate exactly --max-tokens tokens). Cycling through more languages
than slots is the least recently used policy's worst case: every request misses.

Usage: python bench/capacity.py [--model gemma-3-270m] [--languages 64] [--slots 8] [--requests 1000] [--json]
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from intervene_engine.bank import DEFAULT_MAX_CPU_LANGUAGES, BankConfig, parse_map_rank
from lingosteer.backend import engine_kwargs, shutdown_engine
from lingosteer.languages import all_languages
from lingosteer.models import resolve_model
from throughput import PROMPTS, synthetic_intervention  # bench/, this script's directory

CLASSES = ("resident", "swap_in", "load_on_demand")
COUNTERS = ("evictions", "swaps_in", "overflows", "loads_on_demand")
logger = logging.getLogger("bench.capacity")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="prepared model name or HF directory")
    parser.add_argument("--languages", type=int, default=64, help="languages loaded, a synthetic map each")
    parser.add_argument("--slots", type=int, default=8, help="device slots (--max-languages)")
    parser.add_argument("--max-cpu-languages", type=int, default=DEFAULT_MAX_CPU_LANGUAGES,
                        help="maps held on the host; the rest are read again from disk on use")
    parser.add_argument("--map-rank", type=parse_map_rank, default=None, metavar="{RANK,full}",
                        help="rank of the synthetic maps and of the slots (default: full)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start on CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser.parse_args(argv)


def write_artifacts(model_dir: Path, root: Path, count: int, rank: int | None) -> list[Path]:
    """A synthetic map for each of the first `count` languages of the language table (English excepted)."""
    codes = [language.flores for language in all_languages() if language.flores != "eng_Latn"][:count]
    if len(codes) < count:
        raise SystemExit(f"--languages {count}: the language table has {len(codes)} languages besides English")
    return [synthetic_intervention(model_dir, root / code, source=code, seed=i, rank=rank)
            for i, code in enumerate(codes)]


def bank_status(llm) -> dict:
    return llm.collective_rpc("lingosteer_status")[0]["bank"]


def request_class(before: dict, after: dict) -> str:
    if after["loads_on_demand"] > before["loads_on_demand"]:
        return "load_on_demand"
    return "swap_in" if after["swaps_in"] > before["swaps_in"] else "resident"


def latency_summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "p50": None, "p99": None}
    p50, p99 = np.percentile(np.array(seconds) * 1000, [50, 99])
    return {"n": len(seconds), "p50": float(p50), "p99": float(p99)}


def run_requests(llm, languages: list[str], args) -> tuple[dict[str, list[float]], int]:
    """Latencies (s) by class, and the number of errors."""
    from vllm import SamplingParams

    latencies = {name: [] for name in CLASSES}
    errors = 0
    status = bank_status(llm)
    for i in range(args.requests):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                                extra_args={"language": languages[i % len(languages)], "positions": "all"})
        start = time.perf_counter()
        try:
            [output] = llm.generate([PROMPTS[i % len(PROMPTS)]], params, use_tqdm=False)
            failed = len(output.outputs[0].token_ids) != args.max_tokens
        except Exception:  # counted, not fatal: the benchmark measures whether requests fail under churn
            logger.exception("request %d failed", i)
            failed = True
        elapsed = time.perf_counter() - start
        errors += failed
        after = bank_status(llm)
        latencies[request_class(status, after)].append(elapsed)
        status = after
    return latencies, errors


def main(argv=None) -> int:
    args = parse_args(argv)
    bank = BankConfig(args.slots, args.max_cpu_languages, args.map_rank)  # refuses a bad bank before any work
    model_dir = resolve_model(args.model)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        log(f"capacity: writing {args.languages} synthetic maps for {model_dir}")
        artifacts = write_artifacts(model_dir, Path(tmp), args.languages, args.map_rank)
        from vllm import LLM  # local: as in throughput.py, vLLM is imported only once there is work for it

        os.environ.update(bank.env())  # read by the worker when it attaches (BankConfig.from_env)
        llm = LLM(**engine_kwargs(model_dir, max_model_len=256, enforce_eager=args.enforce_eager))
        languages = [llm.collective_rpc("lingosteer_load", args=(str(path),))[0]["language"] for path in artifacts]
        llm.generate([PROMPTS[0]], use_tqdm=False)  # warm-up: the first request pays one-time costs
        before = bank_status(llm)
        log(f"capacity: {args.requests} requests over {len(languages)} languages, {args.slots} slots")
        latencies, errors = run_requests(llm, languages, args)
        after = bank_status(llm)
        shutdown_engine(llm)

    result = {
        "model": str(args.model),
        "languages": args.languages,
        "slots": args.slots,
        "max_cpu_languages": args.max_cpu_languages,
        "max_map_rank": after["max_map_rank"],
        "bank_bytes": after["bank_bytes"],
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "enforce_eager": args.enforce_eager,
        "errors": errors,
        **{counter: after[counter] - before[counter] for counter in COUNTERS},
        "latency_ms": {name: latency_summary(latencies[name]) for name in CLASSES},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {args.model}: {args.requests} requests over {args.languages} languages, {args.slots} slots, "
              f"{args.max_cpu_languages} host copies, rank {result['max_map_rank']}: {errors} errors")
        print(", ".join(f"{counter} {result[counter]}" for counter in COUNTERS))
        print(f"{'class':<15} {'n':>6} {'p50 ms':>9} {'p99 ms':>9}")
        for name, summary in result["latency_ms"].items():
            cells = [f"{summary[q]:>9.1f}" if summary[q] is not None else f"{'-':>9}" for q in ("p50", "p99")]
            print(f"{name:<15} {summary['n']:>6} {' '.join(cells)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
