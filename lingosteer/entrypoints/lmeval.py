"""`lingosteer lm-eval ...`: lm-evaluation-harness's own command line, with the `lingosteer` model.

    lingosteer lm-eval --model lingosteer \\
        --model_args pretrained=gemma-3-270m,interventions=DIR,language=auto --tasks xcopa_sw,xnli_sw

lm-eval 0.4 finds a model only in its own registry (no entry points for other packages'
models), so this command imports `evaluation.lmeval_backend`, which registers `lingosteer`,
and then runs lm-eval's CLI in this process with every argument after `lm-eval` unchanged.
"""

from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    # No options of its own, no -h: everything after `lm-eval` is lm-eval's (see `lingosteer.entrypoints.main.main`).
    parser = subparsers.add_parser("lm-eval", add_help=False,
                                   help="lm-evaluation-harness's CLI with the `lingosteer` model registered")
    parser.set_defaults(func=run_lm_eval, forwards_arguments=True)


def run_lm_eval(args) -> int:
    # Offline unless told otherwise: models and task data come from local caches and files.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # local: importing it registers the `lingosteer` model with lm_eval, which must see the offline settings above
    import evaluation.lmeval_backend  # noqa: F401
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args.forwarded]
    cli_evaluate()
    return 0
