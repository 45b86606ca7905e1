"""Steering on every architecture lingosteer supports, each on a tiny random checkpoint (fp32, eager).

Per architecture, one plugin engine steers one request on every decoder layer (positions "all") beside
plain requests in the same batch; the plain requests are compared with plain vLLM (`VLLM_PLUGINS=''`, a
child process) bitwise, the steered one with the HF transformers reference over its prompt and sampled
logprobs. The logic is `tests/plugin_support.check_architecture_on_model`, the one `tests/test_architectures.py`
asserts on; this script only reports it.

Usage: python bench/architectures.py [--arch NAME ...] [--data-dir DIR] [--work-dir DIR] [--json]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS_DIR))  # the tiny models and the check live with the tests

import tiny_models  # noqa: E402
from plugin_support import check_architecture_on_model  # noqa: E402

from lingosteer import DEFAULT_DATA_DIR  # noqa: E402

KEYS = ("vllm_class", "plain_identical", "steered_max_abs_diff", "tolerance")
log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731


def check_architecture(arch: str, work_dir: Path, data_dir: Path) -> dict:
    """Build (or reuse, under `work_dir/models`) the tiny `arch` model (a name of `tiny_models.ARCHITECTURES`)
    and check steering on it: {"vllm_class", "plain_identical", "steered_max_abs_diff", "tolerance"}."""
    work_dir = Path(work_dir)
    model_dir = tiny_models.cached_tiny_model(arch, work_dir / "models", dtype="float32", data_dir=Path(data_dir))
    (work_dir / arch).mkdir(parents=True, exist_ok=True)
    result = check_architecture_on_model(model_dir, work_dir / arch)
    return {key: result[key] for key in KEYS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=tiny_models.ARCHITECTURES,
                        help="an architecture to check (repeat; default: all)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LINGOSTEER_DATA_DIR", DEFAULT_DATA_DIR)),
                        help="the data directory (the tiny tokenizer trains on its SIB-200 sentences)")
    parser.add_argument("--work-dir", type=Path, help="where models and artifacts go (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print {NAME: {...}} as JSON")
    args = parser.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory(prefix="lingosteer-architectures-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        for arch in args.arch or tiny_models.ARCHITECTURES:
            start = time.perf_counter()
            results[arch] = check_architecture(arch, work_dir, args.data_dir)
            log(f"{arch}: {results[arch]} ({time.perf_counter() - start:.0f} s)")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for arch, result in results.items():
            ok = result["plain_identical"] and result["steered_max_abs_diff"] <= result["tolerance"]
            print(f"{arch:8} {result['vllm_class']:20} plain identical: {result['plain_identical']!s:5} "
                  f"steered max |diff|: {result['steered_max_abs_diff']:.2e} (tolerance {result['tolerance']:.0e})"
                  f"  {'ok' if ok else 'FAIL'}")
    return 0 if all(r["plain_identical"] and r["steered_max_abs_diff"] <= r["tolerance"] for r in results.values()) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
