"""Tensor parallelism: a plugin engine over two tensor-parallel workers steers like one over a single worker.

Both engines (a tiny random checkpoint, fp32, eager) steer the same batch: planted maps on every decoder layer,
positions "all", steered requests beside plain ones; every request's tokens and its prompt and sampled logprobs
are compared. The tensor-parallel engine also takes a load, a swap, a refused load and an unload, each checked on
every rank. On CPU each worker gets its own cores (`VLLM_CPU_OMP_THREADS_BIND`). With `--pipeline`, a
two-stage pipeline-parallel engine (compiled on CPU) is compared too. The logic is
`tests/plugin_support.check_tensor_parallel_on_model`, the one tests/test_tensor_parallel.py asserts on; this
script only reports it.

Usage: python bench/tensor_parallel.py [--arch NAME] [--pipeline] [--data-dir DIR] [--work-dir DIR] [--json]
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
from plugin_support import check_tensor_parallel_on_model  # noqa: E402

from lingosteer import DEFAULT_DATA_DIR  # noqa: E402

KEYS = ("size", "max_abs_diff_tp1", "tolerance", "tokens_identical", "steering_effect")


def check_tensor_parallel(model_dir: Path, work_dir: Path) -> dict:
    """Steer the same batch at TP=2 and TP=1 on `model_dir` (artifacts go under `work_dir`): {"size": 2,
    "max_abs_diff_tp1": largest |logprob difference| over every request's prompt and sampled tokens,
    "tolerance", "tokens_identical", "steering_effect": largest |steered - plain| (the check is not vacuous)}."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    result = check_tensor_parallel_on_model(Path(model_dir), work_dir)
    return {key: result[key] for key in KEYS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=tiny_models.ARCHITECTURES, help="tiny model (llama)")
    parser.add_argument("--pipeline", action="store_true", help="also compare a 2-stage pipeline-parallel engine")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LINGOSTEER_DATA_DIR", DEFAULT_DATA_DIR)),
                        help="the data directory (the tiny tokenizer trains on its SIB-200 sentences)")
    parser.add_argument("--work-dir", type=Path, help="where the model and artifacts go (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lingosteer-tensor-parallel-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        model_dir = tiny_models.cached_tiny_model(args.arch, work_dir / "models", dtype="float32",
                                                  data_dir=args.data_dir)
        if args.pipeline:
            full = check_tensor_parallel_on_model(model_dir, work_dir / "check", pipeline=True)
            result = {**{key: full[key] for key in KEYS}, "pipeline": full["pipeline"]}
        else:
            result = check_tensor_parallel(model_dir, work_dir / "check")
    result = {"model": f"tiny random {args.arch} (fp32)", **result,
              "seconds": round(time.perf_counter() - started, 1)}
    passed = result["tokens_identical"] and result["max_abs_diff_tp1"] <= result["tolerance"]
    if args.pipeline:
        passed = passed and result["pipeline"]["tokens_identical"] and \
            result["pipeline"]["max_abs_diff_tp1"] <= result["tolerance"]
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
        print("passed" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
