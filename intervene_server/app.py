"""Build and run the server: vLLM's OpenAI app, with lingosteer mounted beside its routes.

The engine, vLLM's routes and vLLM's state come from vLLM's own launcher
functions, so every `vllm serve` flag and endpoint behaves as usual. On top:
the language-routing middleware on completions and chat, `/v1/interventions`,
the admin routes (if a token is configured), `/v1/interference*` (if a matrix is
given) and the lingosteer metrics in vLLM's `/metrics`.
"""

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from intervene_server.artifacts import DEFAULT_MAX_UPLOAD_BYTES, UPLOAD_DIR_NAME
from intervene_server.auth import configure_audit_log
from intervene_server.detection import DEFAULT_MIN_CONFIDENCE, LanguageDetector
from intervene_server.interference_api import interference_router
from intervene_server.interventions_api import admin_router, public_router
from intervene_server.middleware import DEFAULT_MAX_REQUEST_BYTES, LanguageRoutingMiddleware
from intervene_server.prompt_tokens import PromptTokenizer
from intervene_server.registry import InterventionRegistry, LoadError
from intervene_server.routing import LanguageRouter
from lingosteer.fingerprint import model_fingerprint

logger = logging.getLogger("lingosteer.server")


@dataclass(frozen=True)
class ServerOptions:
    interventions: Path  # root: preloaded at start; admin loads must come from inside it
    interference: object | None = None  # a loaded matrix.artifact.InterferenceMatrix
    admin_token: str | None = None  # None: admin routes are not mounted
    auto_language: bool = False
    language_confidence: float = DEFAULT_MIN_CONFIDENCE
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # completion and chat bodies
    pins: tuple[str, ...] = ()  # languages (FLORES codes) kept in a device slot from the start


async def attach_lingosteer(app, engine_client, args, options: ServerOptions) -> InterventionRegistry:
    """Mount lingosteer on a built vLLM app whose state is initialised; preload the root."""
    from vllm.renderers.chat_utils import load_chat_template

    registry = InterventionRegistry(engine_client, options.interventions, model_fingerprint(Path(args.model)))
    registry.pin_versions()
    await registry.refresh()
    await preload(registry, options.pins)
    app.state.lingosteer_bank_poll = asyncio.create_task(registry.poll_bank())  # held: tasks are weakly referenced
    prompt_tokenizer = PromptTokenizer(engine_client.get_tokenizer(), load_chat_template(args.chat_template))
    router = LanguageRouter(
        registry, LanguageDetector(options.language_confidence), prompt_tokenizer, options.auto_language,
        served_models=tuple(path.name for path in app.state.openai_serving_models.base_model_paths),
    )
    mount(app, registry, router, options)
    return registry


def mount(app, registry: InterventionRegistry, router: LanguageRouter, options: ServerOptions) -> None:
    """The routing middleware and our routes, on an app that may already have been built."""
    from starlette.middleware import Middleware

    # Innermost, so vLLM's own middleware (API key, CORS) runs first. vLLM has already
    # built the stack (SageMaker bootstrap), so rebuild it from the list as that does.
    app.user_middleware.append(
        Middleware(LanguageRoutingMiddleware, router=router, max_request_bytes=options.max_request_bytes)
    )
    app.middleware_stack = app.build_middleware_stack()
    app.include_router(public_router(registry))
    if options.admin_token is not None:
        configure_audit_log()
        upload_dir = registry.root / UPLOAD_DIR_NAME
        app.include_router(admin_router(registry, options.admin_token, upload_dir, options.max_upload_bytes))
    else:
        logger.info("lingosteer: admin routes disabled (no --admin-token-file, or --no-admin)")
    if options.interference is not None:
        app.include_router(interference_router(options.interference))
    app.openapi_schema = None  # rebuilt with our routes on the next /openapi.json


async def preload(registry: InterventionRegistry, pins: tuple[str, ...] = ()) -> None:
    """Load every artifact under the root fitted on this model (pinning `pins`); others are skipped with a log
    line. Loading keeps at most --max-cpu-languages maps on the host: the rest are read again on first use.
    Artifacts added under the root later are loaded by the first request for their language."""
    chosen = registry.artifacts_under_root()
    missing = sorted(set(pins) - set(chosen))
    if missing:
        raise ValueError(f"--pin {' '.join(missing)}: no intervention for this model under {registry.root} "
                         f"(found: {', '.join(sorted(chosen)) or 'none'})")
    for language, path in chosen.items():
        try:
            info, _ = await registry.load(path, pin=language in pins)
        except LoadError as error:
            raise ValueError(f"cannot preload {path}: {error}") from None
        logger.info("lingosteer: loaded %s version %s from %s", info.language, info.version, info.path)
    if not chosen:
        logger.warning("lingosteer: no intervention for this model under %s", registry.root)


async def run_server(args, options: ServerOptions) -> None:
    """vLLM's single-process `run_server`, with `attach_lingosteer` between app state and serving."""
    import vllm.envs as envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    # As vLLM's run_server: a SIGTERM during start-up (minutes on CPU) interrupts it, and
    # the engine's context manager shuts its processes down; uvicorn takes the signal over
    # once serving. setup_server imports --tool-parser-plugin / --reasoning-parser-plugin.
    def _interrupt_start_up(*_) -> None:
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_start_up)
    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine_client:
        supported_tasks = await engine_client.get_supported_tasks()
        app = build_app(args, supported_tasks, engine_client.model_config)
        await init_app_state(engine_client, app.state, args, supported_tasks)
        await attach_lingosteer(app, engine_client, args, options)
        log_config = get_uvicorn_log_config(args)
        logger.info("lingosteer: serving on %s", listen_address)
        shutdown_task = await serve_http(
            app, sock=sock, enable_ssl_refresh=args.enable_ssl_refresh,
            host=args.host, port=args.port, log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs, ssl_ciphers=args.ssl_ciphers,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
            **({"log_config": log_config} if log_config is not None else {}),
        )
    try:
        await shutdown_task
    finally:
        sock.close()
