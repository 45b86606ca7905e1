"""The engine core's view of which intervention version serves each language.

A view of the workers' stores (`intervene_engine.store`, the one record of what is
loaded; every worker holds the same): read once when the engine core first needs it,
then updated from the answer of each load and unload RPC as it passes through the
engine core, once every worker answered the same (`worker_rpc.agreed_answer`). A
change they disagree on is undone on every worker from this view (`previous`).

Requests enter the scheduler (`EngineCore.add_request`) on the engine core's busy
loop, the same thread that runs load/unload RPCs, in order. Binding a request
there to the version current at that moment is race-free, and the worker then
uses exactly that version for the request's whole life. Retired versions are
released only when no request known to the engine core still names them.
There too each request gets the block hashes that decide which of its KV blocks
the prefix cache may share (`prefix_cache.BlockSalter`).
"""

import logging
from dataclasses import replace

from vllm.v1.request import Request

from alignment.artifact import ServingDefaults
from intervene_engine.prefix_cache import BlockSalter
from intervene_engine.request_spec import VERSION_KEY, RequestSpecError, parse_request_args, resolve

logger = logging.getLogger("lingosteer.plugin")


class EngineDirectory:
    def __init__(self, loaded: list[dict], salter: BlockSalter | None = None) -> None:
        self.versions: dict[str, str] = {entry["language"]: entry["version"] for entry in loaded}
        self.pinned: set[str] = {entry["language"] for entry in loaded if entry.get("pinned")}
        # By version: a request's unset positions are its bound version's (they decide what the cache may share).
        self.serving: dict[str, ServingDefaults] = {
            entry["version"]: ServingDefaults.model_validate(entry["serving"], strict=False) for entry in loaded}
        self.salter = salter

    def follow(self, method: str, answer) -> None:
        """Apply what every worker's store just did (`worker_rpc.agreed_answer`): `lingosteer_load` answers
        the loaded intervention's description, `lingosteer_unload` the version it unloaded."""
        if method == "lingosteer_load":
            self.versions[answer["language"]] = answer["version"]
            self.serving[answer["version"]] = ServingDefaults.model_validate(answer["serving"], strict=False)
            if answer.get("pinned"):
                self.pinned.add(answer["language"])
            else:
                self.pinned.discard(answer["language"])
        elif method == "lingosteer_unload":
            unloaded = {language for language, v in self.versions.items() if v == answer}
            self.versions = {language: v for language, v in self.versions.items() if language not in unloaded}
            self.pinned -= unloaded
            self.serving.pop(answer, None)

    def previous(self, language: str) -> dict | None:
        """What `worker_rpc.lingosteer_restore` restores for `language` when the workers disagree on a change:
        its version here, before the change (None: not loaded)."""
        version = self.versions.get(language)
        return None if version is None else {"version": version, "pinned": language in self.pinned}

    def bind(self, request: Request) -> None:
        """Pin a steered request to the current version; let the prefix cache share only what is plain."""
        params = request.sampling_params
        if params is None:
            return
        try:
            args = parse_request_args(params.extra_args)
        except RequestSpecError as error:  # the front end validates; never stop the engine
            logger.warning("request %s: malformed intervention ignored: %s", request.request_id, error)
            return
        salts = []
        spec = args.intervention
        version = None if spec is None else spec.version or self.versions.get(spec.language)
        if version is not None:  # (None: the worker runs it plain and logs why)
            params.extra_args[VERSION_KEY] = version
            bound = replace(spec, version=version)
            serving = self.serving.get(version)  # None: a version pinned by the front end and retired since
            first = 0 if serving is None else resolve(bound, serving).first_position(request.num_prompt_tokens)
            salts.append((first, bound.cache_salt()))
        if args.score_from is not None:
            salts.append((args.score_from - 1, f"score:{request.request_id}"))
        if salts and self.salter is not None:
            self.salter.salt(request, salts)


def versions_in_use(requests) -> list[str]:
    """Versions named by the engine core's requests (waiting or running)."""
    in_use = set()
    for request in requests:
        params = request.sampling_params
        version = params.extra_args.get(VERSION_KEY) if params is not None and params.extra_args else None
        if version:
            in_use.add(version)
    return sorted(in_use)
