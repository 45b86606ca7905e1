#!/usr/bin/env bash
# `make bench`: every benchmark, each printing ratios measured side by side in one run.
# Usage: bash bench/run_all.sh PYTHON DATA_DIR
set -euo pipefail
python="${1:-.venv/bin/python}"
data="${2:-../shared/data}"
cd "$(dirname "$0")/.."

echo "== prepare the real model (instant once done)"
"$python" -m lingosteer.entrypoints.main models prepare gemma-3-270m

echo "== plugin throughput: plain vLLM vs plugin idle / last / all, and 16 languages mixed in one batch"
echo "   (banks of 16 rank-64 and 16 full slots: mixed-r64-last / mixed-r64-all / mixed-full-last)"
"$python" bench/throughput.py

echo "== bank capacity: 64 languages, 8 device slots, 1000 requests (Zipf-skewed), resident vs needed a load"
"$python" bench/capacity.py

echo "== log-likelihood scoring: today's path vs the fast path vs lm-eval's vllm backend"
"$python" bench/scoring.py --data-dir "$data"

echo "== alignment fit: time and peak memory vs sentence count"
"$python" bench/fit_scaling.py --data-dir "$data" --repeats 1

echo "== XCOPA, small: baseline vs intervened through the plugin, and the HF reference speed ratio"
"$python" bench/xcopa_small.py --data-dir "$data"
