"""Log-likelihood scoring: today's path, the fast path and lm-eval's vLLM backend, side by side.

One run, the same XCOPA validation items (lm-eval's prompts, float32):

  lmeval   lm-evaluation-harness's own `vllm` backend on its `xcopa_<lang>` tasks,
           fed our local validation files; end to end, engine start-up included
  new      our engine + plugin, `score_with_vllm` (prefix sharing, logits only
           for the option rows); end to end on the same plain items
  current  the same engine without those (`shared_prefix=False`): every request
           computes its whole prompt and full-vocabulary logits for every row

Each engine runs as its users get it: lm-eval's plain-vLLM engine in a child process
with vLLM's own process layout (`lm_eval --model vllm`), ours in this process as the
`lingosteer` program runs it (`run_offline_engines_in_process`). They cannot share a
process: the plugin patches vLLM's classes process-wide. The child runs first and has
ended before our engine starts; vLLM is imported before either clock starts.

Plain scoring of every item compares `new` with `lmeval` (wall time, start-up
included, and per-item agreement). A steering grid (5 alphas at the last
context token, a synthetic full-rank map on every layer: the cost does not
depend on its values) on a subset compares `new` with `current`, interleaved
over repetitions; their log-likelihoods are compared request by request.

Usage: python bench/scoring.py [--model gemma-3-270m] [--data-dir ../shared/data] [--json]
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from throughput import synthetic_intervention  # bench/, this script's directory

from evaluation.runner import SCORING_STEP_TOKENS
from evaluation.scoring import PLAIN, Condition, encode_examples, score_with_vllm
from evaluation.tasks import XCOPA, build_examples, load_prompts
from evaluation.tasks import load_items as load_task_items
from lingosteer import DEFAULT_DATA_DIR
from lingosteer.backend import alias_vllm_distribution, configure_cpu_environment, shutdown_engine
from lingosteer.models import resolve_model

GRID = (-1.0, -0.5, 0.5, 1.0, 2.0)
log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="prepared model name or HF directory")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--items", type=int, default=100, help="items per language (XCOPA validation has 100)")
    parser.add_argument("--languages", default="et,ht,id,it,qu,sw,ta,th,tr,vi,zh")
    parser.add_argument("--grid-languages", default="sw,id", help="languages of the steering-grid comparison")
    parser.add_argument("--grid-items", type=int, default=50, help="items per language in the steering grid")
    parser.add_argument("--repetitions", type=int, default=2, help="interleaved repetitions of the grid")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile, in both engines")
    parser.add_argument("--skip-lmeval", action="store_true", help="leave lm-eval's backend out")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser.parse_args(argv)


def load_items(data_dir: Path, languages: list[str], items: int, tokenizer) -> dict:
    """Language -> (encoded options per item, labels)."""

    prompts = load_prompts(XCOPA)
    sets = {}
    for lang in languages:
        task_items = load_task_items(XCOPA, data_dir / "xcopa" / f"val.{lang}.jsonl")[:items]
        examples = build_examples(XCOPA, lang, task_items, prompts, "lm-eval")
        sets[lang] = (encode_examples(tokenizer, examples), np.array([ex.label for ex in examples]))
    return sets


def run_lmeval(model_dir: Path, data_dir: Path, languages: list[str], items: int, dtype: str,
               enforce_eager: bool) -> dict:
    """lm-eval's `vllm` backend on its xcopa tasks over our local files: wall time and chosen options.

    Runs in a process of its own (`lmeval_in_child`): it sets the process's environment and
    points lm-eval's dataset loader at the local files, for good."""
    import datasets
    import lm_eval
    import lm_eval.api.registry
    import lm_eval.api.task
    import lm_eval.tasks
    import vllm  # noqa: F401  imported before the clock starts, as in our engine's process
    from lm_eval.tasks import TaskManager

    alias_vllm_distribution()
    configure_cpu_environment()  # the same KV cache and cores as our engine gets

    def local_xcopa(path, name=None, **kwargs):
        records = [json.loads(line) for line in
                   (data_dir / "xcopa" / f"val.{name}.jsonl").read_text(encoding="utf-8").splitlines()][:items]
        docs = datasets.Dataset.from_list(records)
        return datasets.DatasetDict(validation=docs, test=docs)

    manager = TaskManager(include_path=str(Path(lm_eval.tasks.__file__).parent / "xcopa"), include_defaults=False)
    lm_eval.api.task.datasets.load_dataset = local_xcopa
    os.environ["VLLM_PLUGINS"] = ""  # lm-eval's engine is plain vLLM
    start = time.perf_counter()
    lm = lm_eval.api.registry.get_model("vllm").create_from_arg_string(  # as simple_evaluate(model="vllm") does
        f"pretrained={model_dir},dtype={dtype},max_model_len=1024,seed=0,enforce_eager={enforce_eager}",
        {"batch_size": "auto", "max_batch_size": None, "device": None})
    results = lm_eval.simple_evaluate(model=lm, tasks=[f"xcopa_{lang}" for lang in languages],
                                      task_manager=manager, log_samples=True)
    seconds = time.perf_counter() - start
    shutdown_engine(lm.model)  # its engine's processes would keep this process from exiting
    chosen = {}
    for lang in languages:
        samples = sorted(results["samples"][f"xcopa_{lang}"], key=lambda s: s["doc_id"])
        chosen[lang] = np.array([int(np.argmax([ll for ll, _ in s["filtered_resps"]])) for s in samples])
    return {"seconds": seconds, "chosen": chosen,
            "accuracy": {lang: results["results"][f"xcopa_{lang}"]["acc,none"] for lang in languages}}


def lmeval_in_child(*args) -> dict:
    """`run_lmeval` in a fresh (spawned) process, which has ended when this returns."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(run_lmeval, *args).result()


def plain_requests(sets: dict, languages: list[str]) -> list:

    return [(enc, PLAIN) for lang in languages for options in sets[lang][0] for enc in options]


def grid_requests(sets: dict, languages: list[str], items: int) -> list:

    return [(enc, Condition("swh_Latn", alpha, "last"))
            for alpha in GRID for lang in languages for options in sets[lang][0][:items] for enc in options]


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer
    from vllm import LLM

    from lingosteer.backend import (
        cpu_model_name,
        run_offline_engines_in_process,
        scoring_engine_kwargs,
        shutdown_engine,
    )

    run_offline_engines_in_process()

    model_dir = resolve_model(args.model)
    languages, grid_languages = args.languages.split(","), args.grid_languages.split(",")
    result = {"model": str(args.model), "dtype": args.dtype, "enforce_eager": args.enforce_eager,
              "cpu": cpu_model_name(), "load_average": os.getloadavg()}

    lmeval = None
    if not args.skip_lmeval:
        log(f"scoring: lm-eval's vllm backend, {len(languages)} languages x {args.items} items")
        lmeval = lmeval_in_child(model_dir, args.data_dir, languages, args.items, args.dtype, args.enforce_eager)
        log(f"  lm-eval: {lmeval['seconds']:.1f} s end to end")

    log("scoring: our engine (plugin), plain items")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sets = load_items(args.data_dir, languages, args.items, tokenizer)
    llm = LLM(**scoring_engine_kwargs(model_dir, dtype=args.dtype, max_num_batched_tokens=SCORING_STEP_TOKENS,
                                      enforce_eager=args.enforce_eager))
    startup = time.perf_counter() - start
    plain = score_with_vllm(llm, plain_requests(sets, languages), progress=False)
    ours_seconds = time.perf_counter() - start
    n_items = sum(len(sets[lang][1]) for lang in languages)
    chosen, k = {}, 0
    for lang in languages:
        width = len(sets[lang][0][0])
        n = len(sets[lang][1])
        chosen[lang] = plain.scores[k:k + n * width].reshape(n, width).argmax(axis=1)
        k += n * width
    log(f"  new: {ours_seconds:.1f} s end to end ({startup:.1f} s start-up, {plain.seconds:.1f} s scoring)")

    with tempfile.TemporaryDirectory() as tmp:
        llm.collective_rpc("lingosteer_load", args=(str(synthetic_intervention(model_dir, Path(tmp) / "map")),))
    grid = grid_requests(sets, grid_languages, args.grid_items)
    times = {"current": [], "new": []}
    scores = {}
    for repetition in range(args.repetitions):
        for path in (("current", "new") if repetition % 2 == 0 else ("new", "current")):
            llm.reset_prefix_cache()
            scored = score_with_vllm(llm, grid, progress=False, shared_prefix=path == "new")
            times[path].append(scored.seconds)
            scores[path] = scored
        log(f"  grid repetition {repetition + 1}: current {times['current'][-1]:.1f} s, new {times['new'][-1]:.1f} s")
    shutdown_engine(llm)

    grid_items = len(grid_languages) * args.grid_items
    result.update({
        "items": n_items,
        "languages": languages,
        "new": {"seconds": ours_seconds, "startup_seconds": startup, "scoring_seconds": plain.seconds,
                "items_per_s": n_items / plain.seconds, "cached_token_share": plain.cached_tokens / plain.prompt_tokens,
                "accuracy": {lang: float((chosen[lang] == sets[lang][1]).mean()) for lang in languages}},
        "grid": {"languages": grid_languages, "items": grid_items, "alphas": list(GRID),
                 "item_conditions": grid_items * len(GRID),
                 "current_seconds": times["current"], "new_seconds": times["new"],
                 "cached_token_share": scores["new"].cached_tokens / scores["new"].prompt_tokens},
        "max_abs_ll_diff": float(np.abs(scores["new"].scores - scores["current"].scores).max()),
        "ratios": {"new_vs_current": statistics.median(times["current"]) / statistics.median(times["new"])},
    })
    if lmeval is not None:
        agree = np.concatenate([chosen[lang] == lmeval["chosen"][lang] for lang in languages])
        result["lmeval"] = {"seconds": lmeval["seconds"], "accuracy": lmeval["accuracy"]}
        result["ratios"]["new_vs_lmeval"] = lmeval["seconds"] / ours_seconds
        result["agreement_lmeval"] = float(agree.mean())
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
