"""`lingosteer sweep plan`, `run`, `analyse`, `validate` and `downstream`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lingosteer.languages import normalize_code
from lingosteer.markdown import markdown_table
from matrix import downstream
from matrix.design import choose_partners, design_cost
from matrix.embeddings import language_embeddings
from matrix.report import write_analysis, write_validation
from matrix.sweep import load_records, load_sweep_config, parse_pairs, plan_runs, run_id, run_sweep
from training.corpus import language_data

# The cost of one run: CPU seconds measured for configs/training/cpu.yaml (docs/sweep.md: the
# median over cpu12's runs), GPU-hours estimated for configs/training/paper.yaml (0.1-0.15 on an A100).
CPU_SECONDS_PER_RUN = 20.0
GPU_HOURS_PER_RUN = 0.125


def register(subparsers) -> None:
    sweep = subparsers.add_parser("sweep", help="the encoder interference sweep: train, then analyse")
    commands = sweep.add_subparsers(dest="sweep_command", required=True)

    plan = commands.add_parser("plan", help="the runs of a sweep design and their cost, against the full design; "
                                            "checks every language's data first")
    plan.add_argument("--config", type=Path, help="sweep YAML (its languages, data directory and design)")
    plan.add_argument("--languages", help="comma-separated codes instead of a config's languages")
    plan.add_argument("--k", type=int, help="partners per language (default: the config's design)")
    plan.add_argument("--data", type=Path, help="data directory (default: the config's, else ../shared/data)")
    plan.add_argument("--cpu-seconds-per-run", type=float, default=CPU_SECONDS_PER_RUN,
                      help="CPU seconds of one run (default: measured for configs/training/cpu.yaml)")
    plan.add_argument("--gpu-hours-per-run", type=float, default=GPU_HOURS_PER_RUN,
                      help="GPU-hours of one run (default: estimated for configs/training/paper.yaml)")
    plan.add_argument("--quiet", action="store_true", help="the cost table only, not every run")
    plan.set_defaults(func=_plan)

    validate = commands.add_parser(
        "validate", help="on a block measured in full: hide what the partial design at each k skips, complete, score")
    validate.add_argument("results", type=Path, help="results directory of a sweep")
    validate.add_argument("--out", required=True, type=Path, help="output directory (validation.json, validation.md)")
    validate.add_argument("--languages", help="the block (default: every language with a monolingual run)")
    validate.set_defaults(func=_validate)

    run = commands.add_parser("run", help="train every monolingual and pair encoder of a sweep (resumable)")
    run.add_argument("--config", required=True, type=Path, help="sweep YAML, e.g. configs/sweep/cpu12.yaml")
    _add_ray_arguments(run)
    run.add_argument("--max-runs", type=int, help="run at most this many of the remaining runs")
    run.add_argument("--pairs", help="only these pairs (and their monolingual runs): eng_Latn-fra_Latn,...")
    run.add_argument("--results", type=Path, help="results directory (default: results/sweeps/<config name>)")
    run.add_argument("--gpus-per-run", type=float, default=0, help="GPUs Ray reserves per run (on a GPU cluster: 1)")
    run.set_defaults(func=_run)

    analyse = commands.add_parser("analyse", help="interference matrix, statistics, pictures from a results dir")
    analyse.add_argument("results", type=Path, help="results directory of `sweep run`")
    analyse.add_argument("--out", required=True, type=Path, help="output directory (interference.json, CSV, MD, PNG)")
    analyse.add_argument("--holdout-seed", type=int, default=0, help="seed of the completion cross-validation")
    analyse.add_argument("--embedding-model", help="model name or HF dir for the embedding-similarity proxy (optional)")
    analyse.add_argument("--embedding-layer", type=int, help="decoder layer of the embedding (default: middle)")
    analyse.add_argument("--data", type=Path,
                         help="data directory for the embedding sentences (default: ../shared/data)")
    analyse.add_argument("--validation", type=Path, action="append", default=[],
                         help="validation.json of `sweep validate` (repeatable): a partial design's expected error")
    analyse.set_defaults(func=_analyse)

    downstream = commands.add_parser(
        "downstream", help="does interference predict downstream accuracy? (Table 1: mono vs low/high partners)"
    )
    downstream.add_argument("--matrix", type=Path, help="interference.json (default: configs/interference/)")
    downstream.add_argument("--targets", help="target languages, comma-separated (default: hau_Latn,bel_Cyrl,urd_Arab)")
    downstream.add_argument("--training", type=Path, help="training recipe YAML (default: configs/training/cpu.yaml)")
    downstream.add_argument("--seed", type=int, default=0, help="training seed of every run (the matrix's: 0)")
    downstream.add_argument("--partners-per-side", type=int, default=2,
                            help="lowest- and highest-interference partners per target")
    downstream.add_argument("--results", type=Path, default=Path("results/sweeps/downstream"),
                            help="results directory: run records and encoders (finished runs are reused)")
    downstream.add_argument("--out", type=Path, default=Path("docs/sweep/downstream"),
                            help="report directory (downstream.json, summary.md, downstream.png)")
    downstream.add_argument("--data", type=Path,
                            help="data directory with sib200/ and ntrex128/ (default: ../shared/data)")
    downstream.add_argument("--tokenizer", help="tokenizer.json or HF dir (default: XLM-R, as the sweep)")
    _add_ray_arguments(downstream)
    downstream.set_defaults(func=_downstream)


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the training runs go: a Ray cluster or a local Ray, and how often a failed run is retried."""
    parser.add_argument("--address", help="Ray cluster address (ray://host:10001); default: local Ray")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (one run per CPU)")
    parser.add_argument("--max-retries", type=int, default=2, help="retries of a failed or killed run")


def _plan(args: argparse.Namespace) -> int:
    config = load_sweep_config(args.config) if args.config else None
    if args.languages:
        languages = tuple(dict.fromkeys(normalize_code(code) for code in args.languages.split(",") if code.strip()))
    elif config:
        languages = config.languages
    else:
        raise ValueError("give --config or --languages")
    k = args.k if args.k is not None else (config.partners_per_language if config else None)
    data = language_data(languages, args.data or (config.data_dir if config else None))  # refuses missing data
    pairs = choose_partners(languages, k) if k is not None else None
    runs = plan_runs(languages, pairs)
    if not args.quiet:
        for run in runs:
            print(run_id(run))
    sib_only = sorted(code for code, counts in data.items() if not counts["ntrex128"])
    smallest = min(counts["sib200"] + counts["ntrex128"] for counts in data.values())
    print(f"\n{len(languages)} languages; training sentences per run (sentences_per_language: null): {smallest}"
          + (f"; without NTREX-128 (SIB-200 train+dev only): {', '.join(sib_only)}" if sib_only else ""))
    designs = [design_cost(languages, None)] + ([design_cost(languages, k)] if k is not None else [])
    rows = [["full" if d.partners_per_language is None else f"k = {d.partners_per_language}", d.runs,
             f"{d.runs / len(languages):.1f}", f"{d.hours(args.cpu_seconds_per_run):.2f}",
             f"{d.runs * args.gpu_hours_per_run:.0f}"] for d in designs]
    print(markdown_table(["design", "runs", "runs / N", f"CPU-hours ({args.cpu_seconds_per_run:g} s/run)",
                          f"GPU-hours ({args.gpu_hours_per_run:g}/run)"], rows))
    return 0


def _validate(args: argparse.Namespace) -> int:
    languages = [normalize_code(code) for code in args.languages.split(",")] if args.languages else None
    chosen, written = write_validation(args.results, args.out, languages)
    for path in written:
        print(path)
    print(f"k by the pre-declared rule: {chosen}")
    return 0


def _run(args: argparse.Namespace) -> int:

    config = load_sweep_config(args.config)
    if args.max_runs is not None and args.max_runs < 1:
        raise ValueError("--max-runs must be at least 1")
    pairs = parse_pairs(args.pairs) if args.pairs else None
    results = args.results or Path("results") / "sweeps" / args.config.stem
    total = len(plan_runs(config.languages, pairs if pairs is not None else config.design_pairs()))
    outcome = run_sweep(
        config, results, args.address, args.max_runs, pairs, args.num_cpus, args.max_retries,
        gpus_per_run=args.gpus_per_run,
    )
    print(
        f"sweep {args.config.stem}: {len(outcome.completed)} runs done now, {outcome.skipped} of {total} "
        f"already done or left for later, {len(outcome.failed)} failed; {outcome.wall_seconds:.0f} s; "
        f"results in {results}"
    )
    if outcome.failed:
        print("failed runs (rerun the same command to retry them): " + ", ".join(sorted(outcome.failed)))
        return 1
    return 0


def _analyse(args: argparse.Namespace) -> int:

    embeddings, note = None, ""
    if args.embedding_model:
        languages = tuple(load_records(args.results)[0]["identity"]["languages"])
        embeddings, description = language_embeddings(languages, args.embedding_model, args.data, args.embedding_layer)
        note = description["note"]
    written = write_analysis(args.results, args.out, args.holdout_seed, embeddings, note, args.validation)
    for path in written:
        print(path)
    return 0


def _downstream(args: argparse.Namespace) -> int:

    targets = args.targets.split(",") if args.targets else list(downstream.DEFAULT_TARGETS)
    outcome, written = downstream.run_downstream(
        args.matrix or downstream.DEFAULT_MATRIX, [code.strip() for code in targets if code.strip()],
        args.training or downstream.DEFAULT_TRAINING, args.results, args.out, args.data, args.seed, args.tokenizer,
        args.partners_per_side, args.address, args.num_cpus, args.max_retries,
    )
    print(f"downstream: {len(outcome.completed)} runs trained now, {outcome.skipped} reused from {args.results}, "
          f"{len(outcome.failed)} failed")
    if outcome.failed:
        print("failed runs (rerun the same command to retry them): " + ", ".join(sorted(outcome.failed)))
        return 1
    for path in written:
        print(path)
    return 0
