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
"""

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.artifact import ARTIFACT_FILES, load_intervention
from lingosteer.files import sha256_files


@dataclass(frozen=True)
class LoadedIntervention:
    language: str
    target: str
    version: str
    path: str
    default_alpha: float
    serving: dict  # what a request naming only its language gets: {"alpha", "layers", "positions"}
    evidence: dict | None  # how `serving` was chosen (None: not calibrated)
    # Per layer: D^T (d x d) and b (d) in fp32, so that W h + b - h = h @ D^T + b for row vectors.
    delta_t: dict[int, torch.Tensor]
    bias: dict[int, torch.Tensor]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.delta_t))

    @property
    def memory_bytes(self) -> int:
        tensors = [*self.delta_t.values(), *self.bias.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def describe(self) -> dict:
        return {
            "language": self.language,
            "target": self.target,
            "version": self.version,
            "path": self.path,
            "layers": list(self.layers),
            "default_alpha": self.default_alpha,
            "serving": self.serving,
            "evidence": self.evidence,
            "memory_bytes": self.memory_bytes,
        }


def artifact_version(path: Path) -> str:
    """Content hash of the artifact files: equal files give the same version everywhere."""
    return sha256_files(*(path / name for name in ARTIFACT_FILES))[:16]


def read_intervention(
    path: str | Path, fingerprint: dict, num_layers: int, device: torch.device
) -> LoadedIntervention:
    """Validate and load an artifact for this model; raises ValueError subclasses on bad input."""

    path = Path(path).resolve()
    artifact = load_intervention(path, expected_fingerprint=fingerprint)
    out_of_range = [layer for layer in artifact.layers if not 0 <= layer < num_layers]
    if out_of_range:
        raise ValueError(f"{path}: layers {out_of_range} do not exist in a {num_layers}-layer model")
    delta_t, bias = {}, {}
    for layer in artifact.layers:
        delta, b = artifact.delta(layer)
        delta_t[layer] = torch.as_tensor(delta, dtype=torch.float32).T.contiguous().to(device)
        bias[layer] = torch.as_tensor(b, dtype=torch.float32).to(device)
    return LoadedIntervention(
        language=artifact.source,
        target=artifact.target,
        version=artifact_version(path),
        path=str(path),
        default_alpha=artifact.default_alpha,
        serving=artifact.serving,
        evidence=artifact.evidence,
        delta_t=delta_t,
        bias=bias,
    )


@dataclass
class InterventionStore:
    current: dict[str, str] = field(default_factory=dict)  # language -> version
    versions: dict[str, LoadedIntervention] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, intervention: LoadedIntervention) -> None:
        with self.lock:
            self.versions[intervention.version] = intervention
            self.current[intervention.language] = intervention.version

    def remove(self, language: str) -> str:
        with self.lock:
            if language not in self.current:
                raise KeyError(f"no intervention loaded for {language!r}; loaded: {sorted(self.current)}")
            return self.current.pop(language)

    def get(self, version: str) -> LoadedIntervention | None:
        return self.versions.get(version)

    def release_unused(self, versions_in_use: set[str]) -> None:
        """Drop versions that are neither current nor used by a running request."""
        with self.lock:
            keep = set(self.current.values()) | versions_in_use
            for version in list(self.versions):
                if version not in keep:
                    del self.versions[version]

    def describe(self) -> list[dict]:
        return [self.versions[v].describe() for _, v in sorted(self.current.items())]
