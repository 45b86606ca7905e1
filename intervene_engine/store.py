"""The interventions held by one worker: versioned, swapped atomically.

A version is the content hash of an artifact directory. `current` maps a
language to the version new requests get; older versions stay loaded while
requests that started with them are still running, then are released.

This store is the one record of which version of which language is loaded: only
the `lingosteer_load` / `lingosteer_unload` RPCs change it (and the preload when
the worker attaches). The engine core's `EngineDirectory` and the server's
`InterventionRegistry` hold views of it for their own process: each reads it once
(`lingosteer_list`) and then applies the answer of every load and unload that
passes through it, with no further RPC. The engine core binds each steered request
to a version from its view (the server's front end binds its requests from its own
view before sending them, so their responses can name the version); the worker
only looks bound versions up here.

Every version's map is held on the host in the form it was stored (`bank.CompactMap`), at
most `max_cpu_languages` of them: past that, the least recently used version that no running
request and no pin needs is released to disk (its artifact directory) and read again on its
next use. The device slots a step reads are the bank's (`intervene_engine.bank`).
"""

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from alignment.artifact import Evidence, Intervention, ServingDefaults, artifact_version, load_intervention
from intervene_engine.bank import DEFAULT_MAX_CPU_LANGUAGES, CapacityError, CompactMap


@dataclass(frozen=True)
class LoadedIntervention:
    language: str
    target: str
    version: str
    path: str
    serving: ServingDefaults  # what a request naming only its language gets; its alpha, a request's default
    evidence: Evidence | None  # how `serving` was chosen (None: not calibrated)
    layers: tuple[int, ...]
    form: str  # the artifact's parametrization: full | lowrank | shift
    memory_bytes: int  # of its map on the host, in the form stored and the engine's dtype
    compact: CompactMap | None  # None: released to disk, read again on next use

    def describe(self) -> dict:
        return {
            "language": self.language,
            "target": self.target,
            "version": self.version,
            "path": self.path,
            "layers": list(self.layers),
            "serving": self.serving.model_dump(mode="json"),
            "evidence": None if self.evidence is None else self.evidence.model_dump(mode="json"),
            "memory_bytes": self.memory_bytes,
            "form": self.form,
        }


def compact_map(artifact: Intervention, dtype: torch.dtype) -> CompactMap:
    """The artifact's maps in the form stored, stacked over its layers, in `dtype`: W h + b - h = h @ down @ up + b."""
    form = artifact.manifest.parametrization
    layers = tuple(sorted(artifact.layers))
    tensors = artifact.tensors

    def stacked(per_layer) -> torch.Tensor:
        return torch.stack([per_layer(layer) for layer in layers]).to(dtype).contiguous()

    down = up = None
    if form == "lowrank":  # D = U V, so h @ D^T = h @ V^T @ U^T
        down, up = stacked(lambda layer: tensors[f"V.{layer}"].T), stacked(lambda layer: tensors[f"U.{layer}"].T)
    elif form == "full":  # D = W - I, as the artifact defines it
        down = stacked(lambda layer: artifact.delta(layer)[0].T)
    return CompactMap(form, layers, down, up, stacked(lambda layer: tensors[f"b.{layer}"]))


def read_intervention(path: str | Path, fingerprint: dict, num_layers: int, dtype: torch.dtype) -> LoadedIntervention:
    """Validate and load an artifact for this model; raises ValueError subclasses on bad input."""

    path = Path(path).resolve()
    artifact = load_intervention(path, expected_fingerprint=fingerprint)
    out_of_range = [layer for layer in artifact.layers if not 0 <= layer < num_layers]
    if out_of_range:
        raise ValueError(f"{path}: layers {out_of_range} do not exist in a {num_layers}-layer model")
    compact = compact_map(artifact, dtype)
    return LoadedIntervention(
        language=artifact.source,
        target=artifact.target,
        version=artifact_version(path),
        path=str(path),
        serving=artifact.serving,
        evidence=artifact.evidence,
        layers=compact.layers,
        form=compact.form,
        memory_bytes=compact.memory_bytes,
        compact=compact,
    )


@dataclass
class InterventionStore:
    max_cpu_languages: int = DEFAULT_MAX_CPU_LANGUAGES
    max_pins: int | None = None  # None: no limit (the worker sets the bank's)
    current: dict[str, str] = field(default_factory=dict)  # language -> version
    versions: dict[str, LoadedIntervention] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)  # languages whose current version keeps a device slot
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Versions whose map is on the host, least recently used first.
    _on_host: OrderedDict[str, None] = field(default_factory=OrderedDict)
    loads_on_demand: int = 0  # maps read again from disk because a request needed them

    def install(self, intervention: LoadedIntervention, pin: bool = False) -> None:
        with self.lock:
            if pin and intervention.language not in self.pinned:
                if self.max_pins is not None and len(self.pinned) >= self.max_pins:
                    raise CapacityError(
                        f"cannot pin {intervention.language}: {len(self.pinned)} languages are pinned "
                        f"({', '.join(sorted(self.pinned))}), the most --max-languages allows ({self.max_pins}: "
                        "one slot always stays for unpinned languages); raise --max-languages or unpin one")
                self.pinned.add(intervention.language)
            self.versions[intervention.version] = intervention
            self.current[intervention.language] = intervention.version
            self._on_host[intervention.version] = None
            self._on_host.move_to_end(intervention.version)

    def remove(self, language: str) -> str:
        with self.lock:
            if language not in self.current:
                raise KeyError(f"no intervention loaded for {language!r}; loaded: {sorted(self.current)}")
            self.pinned.discard(language)
            return self.current.pop(language)

    def get(self, version: str) -> LoadedIntervention | None:
        return self.versions.get(version)

    def pinned_versions(self) -> set[str]:
        return {self.current[language] for language in self.pinned}

    def hold(self, version: str, read: Callable[[str], LoadedIntervention]) -> LoadedIntervention:
        """The version with its map on the host (read again from its artifact if it was released)."""
        intervention = self.versions[version]
        if intervention.compact is None:
            again = read(intervention.path)
            if again.version != version:
                raise ValueError(f"{intervention.path} changed on disk since version {version} was loaded "
                                 f"(now {again.version}): load it again")
            intervention = self.versions[version] = again
            self.loads_on_demand += 1
        self._on_host[version] = None
        self._on_host.move_to_end(version)
        return intervention

    @property
    def over_host_capacity(self) -> bool:
        return len(self._on_host) > self.max_cpu_languages

    def trim(self, keep: set[str]) -> set[str]:
        """Release the least recently used maps past `max_cpu_languages` to disk, never one in `keep`
        (used by a running request) nor a pinned one; returns the versions released."""
        released = set()
        keep = keep | self.pinned_versions()
        for version in list(self._on_host):
            if len(self._on_host) <= self.max_cpu_languages:
                break
            if version not in keep:
                del self._on_host[version]
                self.versions[version] = replace(self.versions[version], compact=None)
                released.add(version)
        return released

    def release_unused(self, versions_in_use: set[str]) -> set[str]:
        """Drop versions that are neither current nor used by a running request; returns them."""
        with self.lock:
            keep = set(self.current.values()) | versions_in_use
            dropped = set(self.versions) - keep
            for version in dropped:
                del self.versions[version]
                self._on_host.pop(version, None)
            return dropped

    def describe(self) -> list[dict]:
        return [{**self.versions[v].describe(), "pinned": language in self.pinned}
                for language, v in sorted(self.current.items())]
