"""Every `--json` output is exactly one JSON object on stdout, whatever vLLM logs on the way.

Each command runs as a user runs it, in a subprocess, on a tiny model; `json.loads` of
the whole of stdout must succeed. (`align eval --json` is checked in test_alignment_cli.)
"""

import json
import os
import subprocess
import sys

from lingosteer import REPO_ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ENV.pop("VLLM_LOGGING_STREAM", None)  # the default a user has: vLLM would log to stdout


def run(args: list[str]) -> dict:
    done = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "INFO" in done.stderr  # vLLM did log, to stderr
    return json.loads(done.stdout)


def test_bench_throughput_json_is_one_object(tiny_model_dir):
    # plain and a batch of 4 requests mixing 4 of the 16 languages of a 16-slot rank-64 bank (two engines, as before).
    result = run([sys.executable, "bench/throughput.py", "--model", str(tiny_model_dir("llama")), "--requests", "4",
                  "--max-tokens", "2", "--repetitions", "1", "--enforce-eager", "--modes", "mixed-r64-last", "--json"])
    assert set(result["median_tokens_per_s"]) == {"plain", "mixed-r64-last"}
    assert set(result["ratios"]) == {"mixed-r64-last"}  # the mode names itself mixed
    assert result["modes"]["mixed-r64-last"] == {"engine": "bank-r64", "positions": "last", "languages_per_batch": 4}
    bank = result["engines"]["bank-r64"]["bank"]  # as the worker reports it: the environment reached it
    assert (bank["max_languages"], bank["max_map_rank"], bank["overflows"]) == (16, 64, 0)
    assert result["engines"]["plain"]["bank"] is None and len(result["load_average"]["end"]) == 3


def test_lingosteer_bench_json_is_one_object(tiny_model_dir, data_dir, tmp_path):
    result = run([sys.executable, "-m", "lingosteer.entrypoints.main",
                  "bench", "xcopa", "--model", str(tiny_model_dir("llama")),
                  "--eval", str(data_dir / "xcopa" / "val.sw.jsonl"), "--max-items", "4", "--out", str(tmp_path),
                  "--json"])
    assert result["languages"]["sw"]["n"] == 4


def test_bench_capacity_json_is_one_object(tiny_model_dir):
    # 6 languages, 2 slots and 3 host copies, 12 requests drawn (seeded) from a Zipf law, the default order: some find
    # their map resident, the others evict a slot, and some read a map again from disk.
    result = run([sys.executable, "bench/capacity.py", "--model", str(tiny_model_dir("llama")), "--languages", "6",
                  "--slots", "2", "--max-cpu-languages", "3", "--requests", "12", "--max-tokens", "2",
                  "--enforce-eager", "--json"])
    assert result["errors"] == 0 and result["evictions"] > 0 and result["loads_on_demand"] > 0
    latency = result["latency_ms"]
    assert set(latency) == {"resident", "needed_load", "swap_in", "load_on_demand"}
    assert latency["needed_load"]["n"] == latency["swap_in"]["n"] + latency["load_on_demand"]["n"]
    assert latency["resident"]["n"] > 0 and latency["needed_load"]["n"] > 0
    assert latency["resident"]["n"] + latency["needed_load"]["n"] == 12
