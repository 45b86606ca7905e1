"""The front end's view of the engine's interventions, and the one door to change them.

The worker's store (`intervene_engine.store`) is the one record of which version of
which language is loaded; `loaded` here is a view of it, read once at start-up
(`refresh`) and then updated from the answer of each load and unload, which all go
through this registry one at a time. Each update replaces the dict, so a reader
(routing runs in worker threads) holds one consistent snapshot.

Requests are bound to an intervention version when they are sent to the engine
core: `pin_versions` wraps the engine client's send so that a request waits
while a swap is in flight and then carries the version current at that moment.
Requests and RPCs travel through the same ordered socket to the engine core, so
the version a response reports is the version that served it, even during swaps.
"""
import asyncio
import functools
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path

from alignment.artifact import InterventionError, discover_interventions
from intervene_engine.request_spec import LANGUAGE_KEY, VERSION_KEY
from intervene_engine.vllm_compat import patches_in
from intervene_engine.worker_rpc import agreed_answer
from intervene_server import metrics
from intervene_server.schemas import AppliedIntervention, HistoryEntry, InterventionInfo

logger = logging.getLogger("lingosteer.server")

# The record of the HTTP request being handled (set by the routing middleware).
current_applied: ContextVar[AppliedIntervention | None] = ContextVar("lingosteer_applied", default=None)
# A language looked for under the root and not found is not looked for again this soon: the
# lookup walks the root, and a client may send many requests for a language nobody added.
FIRST_USE_RETRY_SECONDS = 2.0


class LoadError(ValueError):
    """The engine refused an artifact (the old version keeps serving)."""


class NoEarlierVersionError(LookupError):
    """A rollback for a language that has no version before the current one."""


class InterventionRegistry:
    def __init__(self, engine_client, root: Path, fingerprint: dict | None = None):
        self.engine = engine_client
        self.root = root.resolve()
        self.fingerprint = fingerprint  # the served model's: artifacts fitted on others are skipped
        self.loaded: dict[str, InterventionInfo] = {}
        self.history: dict[str, list[HistoryEntry]] = {}  # per language, oldest first
        self._swap = asyncio.Lock()
        self._first_use = asyncio.Lock()
        self._not_found_at: dict[str, float] = {}  # language -> when the root last had no artifact for it
        self._unloaded: set[str] = set()  # unloaded by an admin: not loaded on first use until loaded again

    def artifacts_under_root(self) -> dict[str, Path]:
        """Language -> artifact directory, for the artifacts under the root fitted on the served model."""
        return discover_interventions(self.root, fingerprint=self.fingerprint, within_root=True)

    def artifact_for(self, language: str) -> Path | None:
        """`language`'s artifact under the root, fitted on the served model; other languages' broken or doubled
        artifacts do not stand in its way. None if there is none."""
        try:
            return discover_interventions(self.root, [language], self.fingerprint, within_root=True,
                                          skip_invalid=True)[language]
        except FileNotFoundError:
            return None

    async def refresh(self) -> None:
        """Read the engine's loaded interventions (at start-up: `LINGOSTEER_INTERVENTIONS` may preload some)."""
        entries = agreed_answer("lingosteer_list", await self.engine.collective_rpc("lingosteer_list"))
        self.loaded = {entry["language"]: self._info(entry) for entry in entries}

    async def load(self, path: Path, pin: bool = False, loaded_by: str = "startup",
                   source: str = "startup") -> tuple[InterventionInfo, str | None]:
        """Load or replace (`pin`: keep it in a device slot); returns the new info and the version it replaced."""
        async with self._swap:
            try:
                # One answer per worker: the engine core compared them and rolled back a load they disagreed on
                # (plugin.follow_loads).
                answers = await self.engine.collective_rpc("lingosteer_load", args=(str(path), pin))
                entry = agreed_answer("lingosteer_load", answers)
            except Exception as error:  # the workers' validation error, relayed by the engine core
                raise LoadError(_last_line(error)) from None  # nothing changed
            info = self._info(entry)
            replaced = self.loaded.get(info.language)
            self.loaded = {**self.loaded, info.language: info}
            self._unloaded.discard(info.language)
            self.history.setdefault(info.language, []).append(HistoryEntry(
                version=info.version, path=info.path, loaded_by=loaded_by,
                at=datetime.now(UTC).isoformat(timespec="seconds"), source=source))
        return info, replaced.version if replaced else None

    async def load_on_first_use(self, language: str) -> bool:
        """Load `language` from under the root if an artifact for it was added there after start, as vLLM's
        filesystem LoRA resolver finds an adapter on first use; True if it is loaded now."""
        async with self._first_use:  # concurrent first requests for one language load it once
            if language in self.loaded:
                return True
            if not self.may_find(language):
                return False
            try:
                path = await asyncio.to_thread(self.artifact_for, language)
            except (InterventionError, OSError) as error:  # e.g. two artifacts for this language: refused
                logger.warning("lingosteer: cannot look for %s under %s: %s", language, self.root, error)
                path = None
            if path is None:
                logger.info("lingosteer: no artifact for %s under %s", language, self.root)
                self._not_found_at[language] = time.monotonic()
                return False
            try:
                info, _ = await self.load(path, loaded_by="first use", source="first-use")
            except LoadError as error:
                logger.warning("lingosteer: cannot load %s on first use from %s: %s", language, path, error)
                self._not_found_at[language] = time.monotonic()
                return False
        metrics.INTERVENTION_EVENTS.labels(event="first_use", language=language).inc()
        logger.info("lingosteer: loaded %s version %s from %s on first use", language, info.version, info.path)
        return True

    def may_find(self, language: str) -> bool:
        """Whether to look under the root for `language`: not if an admin unloaded it, nor if it was looked
        for in vain moments ago (routing asks first, so requests in such a language are routed once)."""
        looked_at = self._not_found_at.get(language)
        recent = looked_at is not None and time.monotonic() - looked_at < FIRST_USE_RETRY_SECONDS
        return language not in self._unloaded and not recent

    def previous(self, language: str) -> HistoryEntry:
        """The latest version of `language` loaded before its current one."""
        current = self.version_of(language)
        for entry in reversed(self.history.get(language, [])):
            if entry.version != current:
                return entry
        raise NoEarlierVersionError(f"{language} has no version loaded before {current}: nothing to roll back to")

    def paths_to_keep(self) -> list[Path]:
        """Artifact directories loaded now, or one rollback away: uploads among them must stay."""
        keep = [self.root / info.path for info in self.loaded.values()]
        for language in self.loaded:
            try:
                keep.append(self.root / self.previous(language).path)
            except NoEarlierVersionError:
                pass
        return keep

    async def update_bank_metrics(self) -> None:
        """The bank's gauges from the worker (`lingosteer_status`)."""
        # The first worker's: every worker runs the same steps on the same maps, so their banks are alike.
        status = (await self.engine.collective_rpc("lingosteer_status"))[0]
        metrics.set_bank(status["bank"])

    async def unload(self, language: str) -> str:
        async with self._swap:
            version = agreed_answer("lingosteer_unload",
                                    await self.engine.collective_rpc("lingosteer_unload", args=(language,)))
            self.loaded = {code: info for code, info in self.loaded.items() if code != language}
            self._unloaded.add(language)
        return version

    async def poll_bank(self) -> None:
        """Keep the bank's gauges current: evictions and loads on demand happen in the worker's steps, which
        send no message, so the front end asks (one small RPC every `metrics.BANK_POLL_SECONDS`)."""
        while True:
            await asyncio.sleep(metrics.BANK_POLL_SECONDS)
            try:
                await self.update_bank_metrics()
            except Exception as error:  # a dead engine is reported by vLLM's own health check
                logger.warning("lingosteer: cannot read the bank's state: %s", error)

    def version_of(self, language: str) -> str | None:
        info = self.loaded.get(language)
        return info.version if info else None

    def pin_versions(self) -> None:
        """Wrap the engine core client's send so every steered request carries its version."""
        [send] = patches_in("api server")  # a row of the plugin's table: vllm_compat.check_vllm checks its names
        send.apply(self.engine.engine_core, self)

    def pinned_send(self, send: Callable) -> Callable:
        @functools.wraps(send)
        async def add_request_pinned(request):
            params = request.sampling_params
            extra = params.extra_args if params is not None else None
            if extra and extra.get(LANGUAGE_KEY) and VERSION_KEY not in extra:
                if self._swap.locked():
                    async with self._swap:  # wait for the swap in flight to finish
                        pass
                self._bind(extra)
            await send(request)

        return add_request_pinned

    def _bind(self, extra: dict) -> None:
        applied = current_applied.get()
        version = self.version_of(extra[LANGUAGE_KEY])
        if version is None:  # unloaded between routing and sending: run it plain, and say so
            language = extra.pop(LANGUAGE_KEY)
            if applied is not None:
                applied.applied = False
                applied.reason = f"intervention for {language} was unloaded before the request started"
            return
        extra[VERSION_KEY] = version
        if applied is not None:
            applied.version = version

    def _info(self, entry: dict) -> InterventionInfo:
        path = Path(entry["path"])
        if path.is_relative_to(self.root):
            path = path.relative_to(self.root)
        return InterventionInfo(**{**entry, "path": str(path)})


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
