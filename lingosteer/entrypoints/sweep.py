"""`lingosteer sweep run`, `lingosteer sweep analyse` and `lingosteer sweep downstream`."""

from __future__ import annotations

import argparse
from pathlib import Path

from matrix import downstream
from matrix.embeddings import language_embeddings
from matrix.report import write_analysis
from matrix.sweep import load_records, load_sweep_config, parse_pairs, plan_runs, run_sweep


def register(subparsers) -> None:
    sweep = subparsers.add_parser("sweep", help="the encoder interference sweep: train, then analyse")
    commands = sweep.add_subparsers(dest="sweep_command", required=True)

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


def _run(args: argparse.Namespace) -> int:

    config = load_sweep_config(args.config)
    if args.max_runs is not None and args.max_runs < 1:
        raise ValueError("--max-runs must be at least 1")
    pairs = parse_pairs(args.pairs) if args.pairs else None
    results = args.results or Path("results") / "sweeps" / args.config.stem
    total = len(plan_runs(config.languages, pairs))
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
    written = write_analysis(args.results, args.out, args.holdout_seed, embeddings, note)
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
