"""RPC methods added to vLLM's Worker, called by name through `collective_rpc`.

Arguments and results are plain JSON-able values (paths, strings, dicts): tensors
nested in RPC arguments would arrive as lists, so artifacts travel as file paths.
"""


def lingosteer_load(self, path: str, pin: bool = False) -> dict:
    """Validate and load (or replace) an intervention; the old version keeps serving on failure.
    `pin`: keep the language in a device slot (`bank.DeviceBank`)."""
    return self.model_runner.lingosteer_state.load(path, pin)


def lingosteer_unload(self, language: str) -> str:
    return self.model_runner.lingosteer_state.store.remove(language)


def lingosteer_release_unused(self, versions_in_use: list[str]) -> None:
    """Drop retired versions; the engine core names those its requests still use."""
    self.model_runner.lingosteer_state.release_unused(set(versions_in_use))


def lingosteer_list(self) -> list[dict]:
    state = getattr(self.model_runner, "lingosteer_state", None)
    return state.store.describe() if state is not None else []


def lingosteer_status(self) -> dict:
    """Architecture support, every version held (current or still used in flight) and the bank's state."""
    state = self.model_runner.lingosteer_state
    return {
        "architecture": state.architecture,
        "supported": state.supported,
        "current": dict(state.store.current),
        "versions_held": sorted(state.store.versions),
        "bank": state.bank_status(),
    }


def add_methods(worker_class: type) -> None:
    for method in (lingosteer_load, lingosteer_unload, lingosteer_release_unused, lingosteer_list, lingosteer_status):
        setattr(worker_class, method.__name__, method)
