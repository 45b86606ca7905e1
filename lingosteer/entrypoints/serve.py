"""`lingosteer serve` (vLLM's OpenAI server plus lingosteer) and `lingosteer interventions`.

`lingosteer serve MODEL --interventions DIR [lingosteer options] [any vllm serve flag]`
parses the lingosteer options and hands everything else to vLLM's own argument
parser. `lingosteer interventions push|list|rm` drive a running server's API; push
and rm take several `--server`s, one per member of a fleet.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from alignment.artifact import MANIFEST_NAME, MATRICES_NAME
from intervene_server.artifacts import DEFAULT_MAX_UPLOAD_BYTES
from intervene_server.detection import DEFAULT_MIN_CONFIDENCE
from intervene_server.middleware import DEFAULT_MAX_REQUEST_BYTES
from lingosteer import config_path
from lingosteer.backend import engine_kwargs
from lingosteer.models import resolve_model

SERVER_ENV = "LINGOSTEER_SERVER"
DEFAULT_SERVER = "http://127.0.0.1:8000"
TOKEN_FILE_ENV = "LINGOSTEER_ADMIN_TOKEN_FILE"


def register(subparsers) -> None:
    # Every argument (--help too) goes to the full parser built in serve_command:
    # no option prefix here, so argparse passes them all through untouched.
    serve = subparsers.add_parser(
        "serve", add_help=False, prefix_chars="+", help="serve a model over vLLM's OpenAI API with language steering",
    )
    serve.add_argument("argv", nargs=argparse.REMAINDER)
    serve.set_defaults(func=serve_command)

    interventions = subparsers.add_parser("interventions", help="list, load or unload a server's interventions")
    actions = interventions.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    one_server = argparse.ArgumentParser(add_help=False, parents=[common])
    one_server.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
                            help=f"server base URL (env {SERVER_ENV}; default %(default)s)")
    admin = argparse.ArgumentParser(add_help=False, parents=[common])
    admin.add_argument("--server", dest="servers", action="append", metavar="URL",
                       help=f"server base URL; repeat it for every server of a fleet "
                            f"(default: env {SERVER_ENV}, else {DEFAULT_SERVER})")
    admin.add_argument("--token-file", default=os.environ.get(TOKEN_FILE_ENV),
                       help=f"file holding the admin bearer token (env {TOKEN_FILE_ENV})")

    listing = actions.add_parser("list", parents=[one_server], help="what the server has loaded")
    listing.add_argument("--json", action="store_true", help="print the raw JSON")
    listing.set_defaults(func=list_command)
    push = actions.add_parser("push", parents=[admin], help="load or replace an intervention")
    push.add_argument("path", help="artifact directory: a path inside the server's interventions root, "
                                   "or (with --upload) a local directory to upload")
    push.add_argument("--upload", action="store_true", help="upload the local artifact's files")
    push.add_argument("--pin", action="store_true", help="keep the language in a device slot")
    push.set_defaults(func=push_command)
    remove = actions.add_parser("rm", parents=[admin], help="unload the intervention of a language")
    remove.add_argument("language", help="FLORES-200 or ISO 639 code")
    remove.set_defaults(func=rm_command)
    rollback = actions.add_parser("rollback", parents=[admin], help="load the version loaded before the current one")
    rollback.add_argument("language", help="FLORES-200 or ISO 639 code")
    rollback.set_defaults(func=rollback_command)


def build_serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(
        prog="lingosteer serve", usage="lingosteer serve MODEL --interventions DIR [options]",
        description="vLLM's OpenAI-compatible server with per-request language steering. "
                    "`--help=lingosteer` shows lingosteer's options, `--help=all` every option.",
    ))
    ours = parser.add_argument_group("lingosteer")
    ours.add_argument("--interventions", required=True, metavar="DIR",
                      help="interventions root: artifacts for this model under it are loaded at start; "
                           "admin loads must come from inside it")
    ours.add_argument("--interference", metavar="FILE",
                      help="interference.json to serve at /v1/interference "
                           "(if not given: the project's configs/interference/interference.json, if present)")
    ours.add_argument("--admin-token-file", metavar="FILE",
                      help="file with the bearer token for /admin routes (without it they are off)")
    ours.add_argument("--no-admin", action="store_true", help="do not mount the /admin routes at all")
    ours.add_argument("--auto-language", action="store_true",
                      help="requests without vllm_xargs.language are routed as language 'auto'")
    ours.add_argument("--language-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE, metavar="P",
                      help="minimum language-identification probability to steer")
    ours.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20, metavar="MB",
                      help="admin upload size limit")
    ours.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20, metavar="MB",
                      help="completion and chat request body size limit (413 beyond it)")
    # Defaults: intervene_engine.bank (DEFAULT_*), which says why; given here as text so `--help` stays light.
    ours.add_argument("--max-languages", type=int, default=4, metavar="N",
                      help="device slots: maps one step can read without a host copy (allocated at start)")
    ours.add_argument("--max-cpu-languages", type=int, default=16, metavar="M",
                      help="maps held on the host; the least recently used others are read again from disk")
    ours.add_argument("--max-map-rank", default="full", metavar="R",
                      help="rank of each slot, or 'full' (d x d); a map of higher rank is refused at load")
    ours.add_argument("--pin", action="append", default=[], metavar="LANG",
                      help="FLORES code of a language kept in a device slot (repeat; at most --max-languages - 1)")
    return parser


def apply_machine_defaults(parser, options) -> None:
    """This machine's engine settings (and environment, `backend.engine_kwargs`) wherever the
    options hold vLLM's parser defaults, i.e. where the user gave no value."""

    for key, value in engine_kwargs(options.model, api_server=True).items():
        if getattr(options, key, None) == parser.get_default(key):
            setattr(options, key, value)


def default_interference_file():

    path = config_path("interference", "interference.json")
    return path if path.is_file() else None


def serve_command(args) -> int:
    import uvloop
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    # local: the server loads FastAPI and vLLM's API server, which `lingosteer --help` must not pay for
    from intervene_server.app import ServerOptions, run_server
    from intervene_server.auth import read_token_file
    from intervene_server.interference_api import read_interference

    parser = build_serve_parser()
    options = parser.parse_args(args.argv)
    options.model = str(resolve_model(options.model_tag or options.model))
    apply_machine_defaults(parser, options)
    root = Path(options.interventions)
    if not root.is_dir():
        raise FileNotFoundError(f"interventions root {root} is not a directory")
    interference_file = Path(options.interference) if options.interference else default_interference_file()
    # Read (and validate) now rather than after the engine's long start.
    interference = read_interference(interference_file) if interference_file else None
    if options.api_server_count not in (None, 1) or options.headless:
        raise ValueError("lingosteer serve runs one API server process (no --api-server-count > 1, no --headless)")
    if not 0.0 <= options.language_confidence <= 1.0:
        raise ValueError(f"--language-confidence must lie in [0, 1], got {options.language_confidence}")
    for flag, megabytes in (("--max-request-mb", options.max_request_mb), ("--max-upload-mb", options.max_upload_mb)):
        if not megabytes > 0:
            raise ValueError(f"{flag} must be positive, got {megabytes}")
    bank = bank_config(options)
    os.environ.update(bank.env())  # read by the worker (bank.BankConfig.from_env), a child of this process
    token = None
    if options.admin_token_file and not options.no_admin:
        token = read_token_file(options.admin_token_file)
    server_options = ServerOptions(
        interventions=root, interference=interference,
        admin_token=token, auto_language=options.auto_language,
        language_confidence=options.language_confidence,
        max_upload_bytes=int(options.max_upload_mb * 2**20),
        max_request_bytes=int(options.max_request_mb * 2**20),
        pins=tuple(options.pin),
    )
    cli_env_setup()
    configure_logging_from_args(options)
    validate_parsed_serve_args(options)
    uvloop.run(run_server(options, server_options))
    return 0


def bank_config(options):
    """The bank the options ask for, validated before the engine's long start."""
    from intervene_engine.bank import BankConfig, parse_map_rank  # local: loads torch (see serve_command)

    try:
        rank = parse_map_rank(options.max_map_rank)
    except ValueError:
        raise ValueError(f"--max-map-rank must be a positive integer or 'full', got {options.max_map_rank!r}") from None
    bank = BankConfig(options.max_languages, options.max_cpu_languages, rank)
    if len(options.pin) >= bank.max_languages:
        raise ValueError(f"--pin names {len(options.pin)} languages, but at most --max-languages - 1 = "
                         f"{bank.max_languages - 1} can be pinned (one slot stays for the others); "
                         "raise --max-languages")
    return bank


def _headers(args) -> dict[str, str]:
    token_file = getattr(args, "token_file", None)
    if not token_file:
        return {}
    from intervene_server.auth import read_token_file  # local: loads FastAPI (see serve_command)

    return {"Authorization": f"Bearer {read_token_file(token_file)}"}


def _request(args, server: str, method: str, url: str, **kwargs) -> dict:
    import httpx

    try:
        with httpx.Client(base_url=server.rstrip("/"), headers=_headers(args), timeout=args.timeout) as client:
            response = client.request(method, url, **kwargs)
    except httpx.HTTPError as error:
        raise ValueError(f"cannot reach {server}: {error}") from None
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body["error"]["message"] if "error" in body else body.get("detail", response.text)
        except (ValueError, KeyError, TypeError, AttributeError):
            detail = response.text
        raise ValueError(f"server answered {response.status_code}: {detail}")
    return response.json()


def _on_every_server(args, action: str, request) -> None:
    """`request(server)` on each --server in turn, one line per server (its result, or its error
    on stderr). Every server is tried; if any failed, the error names them."""
    servers = args.servers or [os.environ.get(SERVER_ENV, DEFAULT_SERVER)]
    failed = []
    for server in servers:
        try:
            print(f"{server}: {request(server)}")
        except ValueError as error:
            print(f"{server}: {error}", file=sys.stderr)
            failed.append(server)
    if failed:
        raise ValueError(f"{action} failed on {len(failed)} of {len(servers)} server(s) ({', '.join(failed)}); "
                         "the others took the change; see each with `lingosteer interventions list --server URL` "
                         "and rerun for the failed ones")


def list_command(args) -> int:
    listing = _request(args, args.server, "GET", "/v1/interventions")
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    rows = listing["interventions"]
    if not rows:
        print("no interventions loaded")
    for item in rows:
        serving = item["serving"]
        calibrated = "calibrated" if item.get("evidence") else "uncalibrated"
        default = "off" if serving["alpha"] == 0 else f"alpha={serving['alpha']:g} {serving['positions']}"
        print(f"{item['language']:<10} {item['version']}  default {default} ({calibrated})  "
              f"layers={serving['layers']}  {item['memory_bytes'] / 2**20:.1f} MiB  {item['path']}")
        evidence = item.get("evidence") or {}
        if evidence.get("design"):  # evidence written before the gate's designs (#34) has no design
            print(f"{'':<10} gate design {evidence['design']}: {evidence['decision']}")
    return 0


def push_command(args) -> int:
    if args.upload and args.pin:
        raise ValueError("--pin works with loads by path (push PATH --pin), not with --upload")
    if args.upload:  # read once, before any server is changed: every server gets the same bytes
        local = Path(args.path)
        files = {name: (name, (local / filename).read_bytes())
                 for name, filename in (("manifest", MANIFEST_NAME), ("matrices", MATRICES_NAME))}

    def push(server: str) -> str:
        if args.upload:
            result = _request(args, server, "POST", "/admin/interventions/upload", files=files)
        else:
            result = _request(args, server, "POST", "/admin/interventions", json={"path": args.path, "pin": args.pin})
        loaded = result["loaded"]
        replaced = f" (replaced {result['replaced_version']})" if result.get("replaced_version") else ""
        return f"loaded {loaded['language']} version {loaded['version']}{replaced}"

    _on_every_server(args, "push", push)
    return 0


def rm_command(args) -> int:
    def remove(server: str) -> str:
        result = _request(args, server, "DELETE", f"/admin/interventions/{args.language}")
        return f"unloaded {result['language']} version {result['version']}"

    _on_every_server(args, "rm", remove)
    return 0


def rollback_command(args) -> int:
    def rollback(server: str) -> str:
        result = _request(args, server, "POST", f"/admin/interventions/{args.language}/rollback")
        loaded = result["loaded"]
        return f"rolled {loaded['language']} back to version {loaded['version']} (was {result['replaced_version']})"

    _on_every_server(args, "rollback", rollback)
    return 0
