"""The `lingosteer` console script: one entry point, one subcommand per component.

Each component module exposes `register(subparsers)`, adding its subcommand and
setting `func` on its parsers. Heavy imports (torch, vLLM) happen inside the
command functions so that `lingosteer --help` stays instant.
"""

import argparse
import importlib
import signal
import sys

from lingosteer.backend import run_offline_engines_in_process

SUBCOMMANDS = [
    "lingosteer.entrypoints.models",
    "lingosteer.entrypoints.sweep",
    "lingosteer.entrypoints.align",
    "lingosteer.entrypoints.bench",
    "lingosteer.entrypoints.lmeval",
    "lingosteer.entrypoints.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lingosteer", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A subcommand that wraps another tool's CLI (`lm-eval`) sets `forwards_arguments`
    # and gets every argument it does not know in `args.forwarded`, in order.
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "forwards_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.forwarded = unknown
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as error:
        # Bad input from the user: one clear line, no traceback.
        print(f"lingosteer {args.command}: error: {error}", file=sys.stderr)
        return 2


def program() -> int:
    """The `lingosteer` program (console script, `python -m lingosteer.entrypoints.main`): one command per process."""

    # A plain `kill` ends a command the way Ctrl-C does, through its `finally` blocks: engines
    # shut their processes down, builds remove their staging directories. `serve` installs
    # its own handler (the API server's shutdown).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_offline_engines_in_process()
    return main()


if __name__ == "__main__":
    sys.exit(program())
