"""RPC methods added to vLLM's Worker, called by name through `collective_rpc`, and the check of their answers.

Arguments and results are plain JSON-able values (paths, strings, dicts): tensors
nested in RPC arguments would arrive as lists, so artifacts travel as file paths.

Every worker answers (one answer per rank under tensor parallelism), and every
worker holds the whole store: each rank steers its full copy of the residual stream.
A load or unload that fails on a worker answers `{ERROR_KEY: message}` instead of
raising: vLLM 0.32's multiprocess executor stops reading answers at the first worker
that raised, and the next collective RPC would read the other workers' stale answers
in place of its own. `agreed_answer` turns the answers into one, or raises; the engine
core (`plugin.follow_loads`) calls it on every load and unload and rolls back a change
that not every worker made (`lingosteer_restore`).
"""

import logging
from collections.abc import Callable

logger = logging.getLogger("lingosteer.plugin")

ERROR_KEY = "lingosteer_error"  # an answer {ERROR_KEY: message}: the method raised on that worker


class WorkerRpcError(RuntimeError):
    """A lingosteer RPC failed on every worker (nothing changed), or its answers cannot be used."""


class WorkersDisagreeError(WorkerRpcError):
    """A lingosteer RPC whose workers answered differently: some failed, or they loaded different versions."""


def lingosteer_load(self, path: str, pin: bool = False) -> dict:
    """Validate and load (or replace) an intervention; the old version keeps serving on failure.
    `pin`: keep the language in a device slot (`bank.DeviceBank`)."""
    return _answer(lambda: self.model_runner.lingosteer_state.load(path, pin))


def lingosteer_unload(self, language: str) -> str | dict:
    return _answer(lambda: self.model_runner.lingosteer_state.store.remove(language))


def lingosteer_restore(self, language: str, previous: dict | None) -> dict | None:
    """Undo a load or unload that not every worker made: make `previous` ({"version", "pinned"}, the engine
    directory's entry for `language` before the change; None: it was not loaded) current again. The store
    still holds that version: versions are released only after the engine core followed a change."""

    def restore() -> None:
        state = self.model_runner.lingosteer_state
        store = state.store
        wanted = (None, False) if previous is None else (previous["version"], previous["pinned"])
        if (store.current.get(language), language in store.pinned) == wanted:
            return  # this worker did not make the change
        if language in store.current:
            store.remove(language)  # and the pin a refused load may have added
        if previous is not None:
            intervention = store.versions[previous["version"]]
            store.install(intervention, pin=previous["pinned"])
            if previous["pinned"] and intervention.compact is not None:
                state.bank.pin(intervention.version, intervention.compact, store.pinned_versions())

    return _answer(restore)


def lingosteer_release_unused(self, versions_in_use: list[str]) -> None:
    """Drop retired versions; the engine core names those its requests still use."""
    self.model_runner.lingosteer_state.release_unused(set(versions_in_use))


def lingosteer_list(self) -> list[dict]:
    state = getattr(self.model_runner, "lingosteer_state", None)
    return state.store.describe() if state is not None else []


def lingosteer_status(self) -> dict:
    """The architecture, every version held (current or still used in flight) and the bank's state."""
    state = self.model_runner.lingosteer_state
    return {
        "architecture": state.architecture,
        "current": dict(state.store.current),
        "versions_held": sorted(state.store.versions),
        "bank": state.bank_status(),
    }


def add_methods(worker_class: type) -> None:
    for method in (lingosteer_load, lingosteer_unload, lingosteer_restore, lingosteer_release_unused,
                   lingosteer_list, lingosteer_status):
        setattr(worker_class, method.__name__, method)


def _answer(call: Callable):
    try:
        return call()
    except Exception as error:  # answered, not raised: see the module's docstring
        logger.warning("lingosteer RPC failed on this worker: %s: %s", type(error).__name__, error)
        return {ERROR_KEY: " ".join(str(error).split()) or type(error).__name__}


def failed(answer) -> bool:
    return isinstance(answer, dict) and ERROR_KEY in answer


def _identity(method: str, answer):
    """What must be equal on every worker: the version each load installed (and whether it is pinned),
    each unload removed, each list holds."""
    if method == "lingosteer_load":
        return answer["language"], answer["version"], answer["pinned"]
    if method == "lingosteer_list":
        return sorted((entry["language"], entry["version"], entry["pinned"]) for entry in answer)
    return answer


def agreed_answer(method: str, answers: list):
    """The one answer every worker gave to `method`. Raises WorkerRpcError with the workers' message if every
    worker failed (nothing changed), WorkersDisagreeError naming each rank's answer if they differ."""
    if not answers:
        raise WorkerRpcError(f"{method}: no worker answered")
    errors = [answer[ERROR_KEY] for answer in answers if failed(answer)]
    if len(errors) == len(answers):
        unique = list(dict.fromkeys(errors))
        raise WorkerRpcError(unique[0] if len(unique) == 1 else
                             "; ".join(f"rank {rank}: {error}" for rank, error in enumerate(errors)))
    if not errors and all(_identity(method, answer) == _identity(method, answers[0]) for answer in answers):
        return answers[0]
    raise WorkersDisagreeError(f"the {len(answers)} workers disagree on {method}: "
                               + "; ".join(f"rank {rank} {describe_answer(method, answer)}"
                                           for rank, answer in enumerate(answers)))


def describe_answer(method: str, answer) -> str:
    if failed(answer):
        return f"failed: {answer[ERROR_KEY]}"
    if method == "lingosteer_load":
        return f"loaded {answer['language']} version {answer['version']}" + (" (pinned)" if answer["pinned"] else "")
    if method == "lingosteer_unload":
        return f"unloaded version {answer}"
    return f"answered {_identity(method, answer)}"
