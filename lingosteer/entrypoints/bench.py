"""`lingosteer bench xcopa|xnli`: baseline vs intervened accuracy through the vLLM plugin.

    lingosteer bench xcopa --model gemma-3-270m --interventions interventions/gemma-3-270m \\
        --calibrate ../shared/data/xcopa/val.sw.jsonl --eval test.sw.jsonl --out reports/xcopa
    lingosteer bench xcopa ... --eval ../shared/data/xcopa --cross-fit 2 --out reports/xcopa-val
    lingosteer bench xnli  ... (same shape; .tsv and .jsonl files)

Progress bars go to stderr; `--json` prints exactly one JSON object to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from evaluation.calibration import DEFAULT_GRID, parse_grid
from evaluation.report import markdown, write_report
from evaluation.runner import BenchmarkConfig, run_benchmark
from evaluation.tasks import PROMPT_STYLES, TASKS
from alignment.artifact import DEFAULT_POSITIONS, POSITION_MODES


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="XCOPA / XNLI accuracy, baseline vs intervened, alpha calibrated")
    tasks = bench.add_subparsers(dest="bench_task", required=True)
    for task in TASKS.values():
        parser = tasks.add_parser(task.name, help=f"{task.name.upper()} benchmark (files <split>.<lang>.jsonl|tsv)")
        parser.add_argument("--model", required=True, help="prepared model name or Hugging Face model directory")
        parser.add_argument("--interventions", type=Path, nargs="+", default=None, metavar="DIR",
                            help="directory of intervention artifacts (one per language, at any depth); under "
                                 "--cross-fit K also K directories, the k-th used for fold k (fitted without it); "
                                 "without it every language is scored plain (a baseline)")
        parser.add_argument("--eval", nargs="+", required=True, metavar="PATH",
                            help="evaluation files or directories; the language comes from the file name")
        parser.add_argument("--calibrate", nargs="+", default=None, metavar="PATH",
                            help="calibration files or directories (alpha chosen per language on these only)")
        parser.add_argument("--cross-fit", type=int, default=None, metavar="K",
                            help="no calibration files: cut each evaluation file into K contiguous folds and "
                                 "evaluate each fold with the alpha chosen on the others (K=2: halves, swapped)")
        parser.add_argument("--out", type=Path, required=True, help="report directory")
        parser.add_argument("--alpha-grid", type=parse_grid, default=DEFAULT_GRID,
                            help="comma-separated alphas tried in calibration (default %(default)s)")
        parser.add_argument("--steer", choices=tuple(POSITION_MODES), default=DEFAULT_POSITIONS,
                            help="tokens steered, as a served request's positions with the context as the prompt: "
                                 "the last context token (INCLINE, default), every context token after BOS, "
                                 "or context and option tokens")
        parser.add_argument("--prompt", choices=PROMPT_STYLES, default="lm-eval",
                            help="lm-eval log-likelihood templates (default) or a multiple-choice prompt")
        parser.add_argument("--prompts", type=Path, default=None,
                            help=f"prompt configuration (default configs/bench/{task.name}.yaml)")
        parser.add_argument("--groups", type=Path, default=None,
                            help="language groups to average over (default configs/bench/groups.yaml)")
        parser.add_argument("--max-items", type=int, default=None, help="use only the first N items of each file")
        parser.add_argument("--skip-items", type=int, default=0, metavar="N",
                            help="leave out the first N items of each evaluation file, e.g. the items an artifact "
                                 "was calibrated on (then --max-items counts from item N)")
        parser.add_argument("--reference", choices=["hf"], default=None,
                            help="also score a sample with HF transformers: cross-check and speed ratio")
        parser.add_argument("--reference-sample", type=int, default=20, help="items in the reference sample")
        parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the delta CI")
        parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
        parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                            help="engine dtype (default %(default)s: pinned so reports compare across CPUs)")
        parser.add_argument("--incline", type=Path, default=None, metavar="DIR",
                            help="INCLINE-form artifacts (align fit --recipe incline): also score INCLINE as "
                                 "published on the same items, side by side (evaluation/incline.py)")
        parser.add_argument("--json", action="store_true", help="print the report as one JSON object to stdout")
        parser.set_defaults(func=run_bench, task=task)


def run_bench(args) -> int:

    if args.cross_fit is not None and args.cross_fit < 2:
        raise ValueError("--cross-fit needs at least 2 folds")
    if args.bootstrap < 100:
        raise ValueError("--bootstrap needs at least 100 resamples")
    config = BenchmarkConfig(
        task=args.task, model=args.model, eval_paths=args.eval, interventions=args.interventions,
        calibrate_paths=args.calibrate, cross_fit=args.cross_fit, alpha_grid=args.alpha_grid, steer=args.steer,
        prompt_style=args.prompt, prompts_path=args.prompts, groups_path=args.groups, max_items=args.max_items,
        skip_items=args.skip_items, reference=args.reference, reference_sample=args.reference_sample,
        bootstrap=args.bootstrap, seed=args.seed, dtype=args.dtype, scores_dir=args.out / "scores",
        incline=args.incline,
    )
    report, items = run_benchmark(config)
    paths = write_report(report, items, args.out)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(markdown(report))
    print(f"report: {paths['json']} {paths['markdown']} {paths['plot']}", file=sys.stderr)
    return 0
