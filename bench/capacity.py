"""Capacity of the bank of maps: many languages, few device slots, requests spread over them.

One plugin engine with a bank of --slots device slots and --max-cpu-languages host copies
(`intervene_engine.bank`), --languages languages loaded (a synthetic map each, on every
layer), then --requests requests one after the other, each steered (every position) toward
one language, chosen by --order:

  skewed  drawn (seeded) from a Zipf law over the languages, P(k-th) ~ 1 / k^--zipf-exponent:
          a few hot languages take most requests, as in real traffic (s = 1 over 64 languages:
          the top 8 take 57%)
  cycle   request i toward language i mod --languages: with more languages than slots, the least
          recently used policy's worst case, every request misses

Each request is classed by what the bank had to do for it, read from the worker's status
before and after it:

  resident        its map was in a slot already
  swap_in         its map was copied from the host into a slot
  load_on_demand  its map had been released to disk and was read again (then copied into a slot)

and we report the count and p50 / p99 latency of each class and of needed_load (swap_in and
load_on_demand together: every request that needed its map loaded into a slot), the bank's
evictions, copies into slots, overflows and loads on demand over the run, and the errors
(a request that raised, or did not generate exactly --max-tokens tokens).

Usage: python bench/capacity.py [--model gemma-3-270m] [--languages 64] [--slots 8] [--requests 1000]
                                [--order skewed|cycle] [--json]
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from intervene_engine.bank import DEFAULT_MAX_CPU_LANGUAGES, BankConfig, parse_map_rank
from lingosteer.backend import shutdown_engine
from lingosteer.models import resolve_model
from throughput import (  # bench/, this script's directory
    PROMPTS, bank_status, start_engine, synthetic_interventions, table_languages)

CLASSES = ("resident", "swap_in", "load_on_demand")
NEEDED_LOAD = ("swap_in", "load_on_demand")  # reported together as "needed_load"
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
    parser.add_argument("--order", choices=("skewed", "cycle"), default="skewed",
                        help="which language each request asks for (default: skewed)")
    parser.add_argument("--zipf-exponent", type=float, default=1.0, help="skew of --order skewed")
    parser.add_argument("--seed", type=int, default=0, help="seed of --order skewed")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start on CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser.parse_args(argv)


def request_order(args) -> list[int]:
    """The index of the language each request asks for (`--order`)."""
    if args.order == "cycle":
        return [i % args.languages for i in range(args.requests)]
    weights = 1.0 / np.arange(1, args.languages + 1) ** args.zipf_exponent
    rng = np.random.default_rng(args.seed)
    return rng.choice(args.languages, size=args.requests, p=weights / weights.sum()).tolist()


def request_class(before: dict, after: dict) -> str:
    if after["loads_on_demand"] > before["loads_on_demand"]:
        return "load_on_demand"
    return "swap_in" if after["swaps_in"] > before["swaps_in"] else "resident"


def latency_summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "p50": None, "p99": None}
    p50, p99 = np.percentile(np.array(seconds) * 1000, [50, 99])
    return {"n": len(seconds), "p50": float(p50), "p99": float(p99)}


def run_requests(llm, languages: list[str], order: list[int], args) -> tuple[dict[str, list[float]], int]:
    """Latencies (s) by class, and the number of errors."""
    from vllm import SamplingParams

    latencies = {name: [] for name in CLASSES}
    errors = 0
    status = bank_status(llm)
    for i, language in enumerate(order):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                                extra_args={"language": languages[language], "positions": "all"})
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
        codes = table_languages(args.languages)
        artifacts = synthetic_interventions(model_dir, {code: Path(tmp) / code for code in codes}, args.map_rank)
        llm = start_engine(model_dir, bank, args, engines=1)  # its worker holds `bank`, or it stops here
        languages = [llm.collective_rpc("lingosteer_load", args=(str(path),))[0]["language"] for path in artifacts]
        llm.generate([PROMPTS[0]], use_tqdm=False)  # warm-up: the first request pays one-time costs
        before = bank_status(llm)
        order = request_order(args)
        log(f"capacity: {args.requests} requests ({args.order}) over {len(languages)} languages, {args.slots} slots")
        latencies, errors = run_requests(llm, languages, order, args)
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
        "order": args.order,
        **({"zipf_exponent": args.zipf_exponent, "seed": args.seed} if args.order == "skewed" else {}),
        "languages_requested": len(set(order)),
        "max_tokens": args.max_tokens,
        "enforce_eager": args.enforce_eager,
        "errors": errors,
        **{counter: after[counter] - before[counter] for counter in COUNTERS},
        "latency_ms": {"resident": latency_summary(latencies["resident"]),
                       "needed_load": latency_summary([t for name in NEEDED_LOAD for t in latencies[name]]),
                       **{name: latency_summary(latencies[name]) for name in NEEDED_LOAD}},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {args.model}: {args.requests} requests ({args.order}) over {args.languages} languages "
              f"({result['languages_requested']} asked for), {args.slots} slots, "
              f"{args.max_cpu_languages} host copies, rank {result['max_map_rank']}: {errors} errors")
        print(", ".join(f"{counter} {result[counter]}" for counter in COUNTERS))
        print(f"{'class':<15} {'n':>6} {'p50 ms':>9} {'p99 ms':>9}")
        for name, summary in result["latency_ms"].items():
            cells = [f"{summary[q]:>9.1f}" if summary[q] is not None else f"{'-':>9}" for q in ("p50", "p99")]
            print(f"{name:<15} {summary['n']:>6} {' '.join(cells)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
