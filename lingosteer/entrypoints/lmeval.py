"""`lingosteer lm-eval ...`: lm-evaluation-harness's own command line, with the `lingosteer` model;
`lingosteer lm-eval-tasks`: lm-eval's XCOPA / XNLI tasks on local data files, for plain `lm_eval`.

    lingosteer lm-eval --local-data ../shared/data --model lingosteer \\
        --model_args pretrained=gemma-3-270m,interventions=DIR,language=auto --tasks xcopa_sw,xnli_sw
    lingosteer lm-eval-tasks --data ../shared/data --out DIR && lm_eval --include_path DIR ...

lm-eval 0.4 finds a model only in its own registry (no entry points for other packages'
models), so `lm-eval` imports `evaluation.lmeval_backend`, which registers `lingosteer`,
and then runs lm-eval's CLI in this process with every argument after `lm-eval` unchanged,
but one of its own: `--local-data DIR` writes lm-eval's own XCOPA / XNLI tasks, their items
read from DIR (`evaluation.lmeval_tasks`), into a temporary directory for the run and
passes it as `--include_path` (the Hub, where those tasks fetch their data, is out of reach).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from evaluation.lmeval_tasks import write_local_tasks
from lingosteer import DEFAULT_DATA_DIR

INCLUDE_PATH = "--include_path"


def register(subparsers) -> None:
    # No -h of its own: everything after `lm-eval` but --local-data is lm-eval's
    # (see `lingosteer.entrypoints.main.main`).
    parser = subparsers.add_parser("lm-eval", add_help=False,
                                   help="lm-evaluation-harness's CLI with the `lingosteer` model registered "
                                        "(and --local-data DIR: lm-eval's XCOPA / XNLI tasks on local files)")
    parser.add_argument("--local-data", type=Path, default=None, metavar="DIR",
                        help="data directory: lm-eval's own xcopa_<iso> / xnli_<iso> tasks read their items from "
                             "DIR/xcopa/val.<iso>.jsonl and DIR/xnli/dev.<iso>.tsv")
    parser.set_defaults(func=run_lm_eval, forwards_arguments=True)
    tasks = subparsers.add_parser("lm-eval-tasks",
                                  help="write lm-eval's own XCOPA / XNLI tasks on local data files, for "
                                       "`lm_eval --include_path DIR`")
    tasks.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR,
                       help="data directory with xcopa/val.<iso>.jsonl, xnli/dev.<iso>.tsv (default %(default)s)")
    tasks.add_argument("--out", type=Path, required=True, help="where the task files go")
    tasks.set_defaults(func=run_lm_eval_tasks)


def run_lm_eval(args) -> int:
    # Offline unless told otherwise: models and task data come from local caches and files.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate

    # local: importing it registers the `lingosteer` model with lm_eval, which must see the offline settings above
    from evaluation.lmeval_backend import close_all

    with tempfile.TemporaryDirectory(prefix="lingosteer-lm-eval-tasks-") as tasks_dir:
        forwarded = args.forwarded
        if args.local_data is not None:
            forwarded = with_local_tasks(forwarded, args.local_data, Path(tasks_dir))
        sys.argv = ["lm-eval", *forwarded]
        try:
            cli_evaluate()
        finally:
            close_all()  # before exit: see lmeval_backend._OPEN
    return 0


def with_local_tasks(forwarded: list[str], data_dir: Path, tasks_dir: Path) -> list[str]:
    """lm-eval's arguments with the local tasks of `data_dir`, written into `tasks_dir`, as its include path."""
    if any(arg == INCLUDE_PATH or arg.startswith(INCLUDE_PATH + "=") for arg in forwarded):
        raise ValueError(f"--local-data and {INCLUDE_PATH} cannot go together (lm-eval takes one include path, and "
                         f"--local-data passes its own): write the local tasks beside yours with "
                         f"`lingosteer lm-eval-tasks --data {data_dir} --out YOUR_DIR` instead of --local-data")
    write_local_tasks(data_dir, tasks_dir)
    return [*forwarded, INCLUDE_PATH, str(tasks_dir)]


def run_lm_eval_tasks(args) -> int:
    names = write_local_tasks(args.data, args.out)
    print(f"{len(names)} tasks in {args.out}: {', '.join(names)}")
    print(f"use them with: lm_eval --include_path {args.out} --tasks {names[0]} ...")
    return 0
