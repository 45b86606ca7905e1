"""The intervention artifact: one directory per (model, source -> target language).

    <dir>/manifest.json          what the matrices are and where they came from
    <dir>/matrices.safetensors   W.{l} [d, d] (or U.{l} [d, r] + V.{l} [r, d], or nothing
                                 for a mean shift, where W = I) and b.{l} [d]

Serving applies h' = h + alpha * (W h + b - h) at each listed layer l (column
vectors; see docs/design.md). Two forms of W are recorded in `form`:
- "map": W, b is the fitted map from source to target states, so alpha = 1
  replaces a state by its mapped image.
- "incline": INCLINE's additive form h' = h + s * (h W_incline) with row
  vectors; stored as W = I + W_incline^T, b = 0, so that alpha = s.

`serving` holds what a request that names only its language gets: alpha, layers
and positions. `lingosteer align build` chooses them on labelled calibration data and
records the `evidence`; alpha 0 means "off" (the calibration found no clear gain).
Format version 2 added both; a version-1 manifest still loads, with serving
{default_alpha, every layer, "last"} and no evidence (what version 1 served).

Loading trusts nothing: the manifest is validated by the pydantic model
`InterventionManifest`, and every kind of problem has its own `InterventionError`
subclass so callers (and ops teams reading logs) can tell what was wrong.
Tensors are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lingosteer.files import atomic_path
from lingosteer.fingerprint import FingerprintMismatch, check_fingerprint
from lingosteer.validation import first_problem

FORMAT = "lingosteer.intervention"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SERVING_POSITIONS = ("last", "prompt", "all")
MANIFEST_NAME = "manifest.json"
MATRICES_NAME = "matrices.safetensors"
ARTIFACT_FILES = (MANIFEST_NAME, MATRICES_NAME)
FORMULA = "h' = h + alpha * (W h + b - h)"
PARAMETRIZATIONS = ("full", "lowrank", "shift")
FORMS = ("map", "incline")
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_BYTES = 16 * 2**30
# A safetensors header is JSON describing the tensors; anything bigger is not one.
_MAX_HEADER_BYTES = 100 * 2**20

logger = logging.getLogger("lingosteer.artifact")


class InterventionError(ValueError):
    """An intervention artifact that cannot be used."""


class InterventionNotFoundError(InterventionError):
    """The path is not an artifact directory with a manifest."""


class ManifestError(InterventionError):
    """manifest.json is not valid JSON or lacks / mistypes a field."""


class FormatVersionError(InterventionError):
    """The artifact was written in a format version this code does not read."""


class ParametrizationError(InterventionError):
    """Unknown parametrization or form."""


class FingerprintMismatchError(InterventionError, FingerprintMismatch):
    """The artifact was fitted on a different model."""


class NotSafetensorsError(InterventionError):
    """The matrices file is missing, too large, or not a safetensors file."""


class TensorDtypeError(InterventionError):
    """Tensors are not float32/bfloat16 as the manifest says."""


class MissingTensorError(InterventionError):
    """A tensor the manifest's layers require is absent."""


class UnexpectedTensorError(InterventionError):
    """The file holds tensors the manifest does not account for."""


class ShapeMismatchError(InterventionError):
    """A tensor's shape does not fit the model's hidden size."""


class NonFiniteError(InterventionError):
    """A tensor contains NaN or infinity."""


# A bad value in one of these fields has its own error class; any other problem is a ManifestError.
_FIELD_ERRORS = {"format_version": FormatVersionError, "parametrization": ParametrizationError,
                 "form": ParametrizationError, "dtype": TensorDtypeError}


# ---- the manifest -------------------------------------------------------------------


class ServingDefaults(BaseModel):
    """What a request that names only its language gets; alpha 0 means off."""

    model_config = ConfigDict(strict=True, extra="forbid")

    alpha: Annotated[float, Field(ge=-10.0, le=10.0, description="0 means off: the calibration found no clear gain")]
    layers: Annotated[list[int], Field(min_length=1, description="the layers steered, a subset of the artifact's")]
    positions: Literal[SERVING_POSITIONS] = Field(
        description="the tokens steered: the last prompt token (INCLINE), every prompt token, or every prompt and "
                    "generated token (a leading BOS never)")


class InterventionManifest(BaseModel):
    """manifest.json, format versions 1 and 2 (version 1 is read as the version 2 it stands for).

    Fields it does not name are kept: a manifest may record more than this code reads.
    """

    model_config = ConfigDict(strict=True, extra="allow")

    format: Literal[FORMAT]
    format_version: Literal[READABLE_VERSIONS]
    model: dict[str, Any]
    source: str
    target: str
    layers: Annotated[list[int], Field(min_length=1)]
    hidden_size: int
    parametrization: Literal[PARAMETRIZATIONS]
    rank: Annotated[int, Field(ge=1)] | None = None
    form: Literal[FORMS]
    formula: str
    pooling: str
    solver: str
    lambdas: list[float | None]
    default_alpha: float
    serving: ServingDefaults
    evidence: dict[str, Any] | None = None
    dtype: Literal[DTYPES]
    fit_data: dict[str, Any]
    metrics: dict[str, Any]
    created: str

    @model_validator(mode="before")
    @classmethod
    def _version_1_serving(cls, data: Any) -> Any:
        """Version 1 had no serving defaults: it served default_alpha at every layer, at the last token."""
        if isinstance(data, dict) and data.get("format_version") == 1 and "serving" not in data:
            serving = {"alpha": data.get("default_alpha"), "layers": data.get("layers"), "positions": "last"}
            return {**data, "serving": serving, "evidence": None}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> InterventionManifest:
        if len(set(self.layers)) != len(self.layers):
            raise ManifestError(f"layers must be distinct, got {self.layers}")
        num_layers = self.model.get("num_hidden_layers")
        if isinstance(num_layers, int) and not all(0 <= layer < num_layers for layer in self.layers):
            raise ManifestError(f"layers {self.layers} do not exist in a {num_layers}-layer model")
        if not set(self.serving.layers) <= set(self.layers):
            raise ManifestError(f"serving layers {self.serving.layers} are not a non-empty subset of the "
                                f"artifact's layers {self.layers}")
        if self.parametrization == "lowrank" and self.rank is None:
            raise ManifestError("a lowrank artifact needs a positive integer rank")
        model_hidden = self.model.get("hidden_size")
        if model_hidden is not None and model_hidden != self.hidden_size:
            raise ShapeMismatchError(f"hidden_size {self.hidden_size} but the model's is {model_hidden}")
        return self


def _validated(manifest: Any, manifest_path: Path) -> dict:
    """The manifest as its model reads it (version 1 migrated), or the `InterventionError` that says why not."""
    try:
        return InterventionManifest.model_validate(manifest).model_dump(exclude_unset=True)
    except ValidationError as invalid:
        problem = first_problem(invalid)
        error_class = type(problem.raised) if problem.raised else _FIELD_ERRORS.get(problem.field, ManifestError)
        raise error_class(f"{manifest_path}: {problem.message}") from None


# ---- writing ------------------------------------------------------------------------


def save_intervention(
    out_dir: str | Path,
    aligner,
    *,
    fingerprint: dict,
    source: str,
    target: str,
    layers: list[int],
    pooling: str,
    fit_data: dict,
    metrics: dict | None = None,
    dtype: str = "float32",
    form: str = "map",
    default_alpha: float = 1.0,
    serving: dict | None = None,
    evidence: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a solved `LinearAligner` as an artifact directory, atomically.

    `layers[i]` is the model layer of the aligner's i-th fitted map. The directory
    appears complete or not at all; an existing one is replaced only with `overwrite`.
    """
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    W, b = aligner.W_, aligner.b_
    if len(layers) != W.shape[0]:
        raise ValueError(f"{len(layers)} layer indices for {W.shape[0]} fitted maps")
    parametrization = aligner.parametrization_
    if form == "incline" and (parametrization != "full" or aligner.bias):
        raise ValueError("the INCLINE form stores a full matrix without bias: use rank=None, bias=False")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite to replace it")

    torch_dtype = getattr(torch, dtype)
    tensors = {}
    for i, layer in enumerate(layers):
        if parametrization == "lowrank":
            tensors[f"U.{layer}"] = torch.from_numpy(aligner.U_[i]).to(torch_dtype).contiguous()
            tensors[f"V.{layer}"] = torch.from_numpy(aligner.V_[i]).to(torch_dtype).contiguous()
        elif parametrization == "shift":
            pass  # W = I: the bias is the whole map
        elif form == "incline":
            tensors[f"W.{layer}"] = torch.from_numpy(np.eye(W.shape[1]) + W[i]).to(torch_dtype)
        else:
            tensors[f"W.{layer}"] = torch.from_numpy(W[i]).to(torch_dtype)
        tensors[f"b.{layer}"] = torch.from_numpy(b[i]).to(torch_dtype)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": fingerprint,
        "source": source,
        "target": target,
        "layers": [int(layer_index) for layer_index in layers],
        "hidden_size": int(W.shape[1]),
        "parametrization": parametrization,
        "rank": int(aligner.U_.shape[2]) if parametrization == "lowrank" else None,
        "form": form,
        "formula": FORMULA,
        "pooling": pooling,
        "solver": aligner.solver,
        "bias": bool(aligner.bias),
        "standardise": aligner.standardise,
        "lambdas": [None if np.isnan(lam) else float(lam) for lam in aligner.lambdas_],
        "default_alpha": float(default_alpha),
        "serving": serving or {"alpha": float(default_alpha), "layers": [int(layer_index) for layer_index in layers],
                               "positions": "last"},
        "evidence": evidence,
        "dtype": dtype,
        "fit_data": fit_data,
        "metrics": metrics or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(staging / MATRICES_NAME))
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        # mkdtemp makes a private directory; an artifact is meant to be shared like any file.
        os.chmod(staging, 0o755)
        for name in ARTIFACT_FILES:
            os.chmod(staging / name, 0o644)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is swapped out first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / "previous")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ---- finding ------------------------------------------------------------------------


def find_artifact_dirs(root: str | Path) -> list[Path]:
    """Every artifact directory under `root`, sorted: each directory holding a manifest, `root`
    itself included, at any depth.

    Hidden directories and everything under them are skipped: a writer's staging area (such as
    `save_intervention`'s `.<name>.xyz`, or an upload in progress) holds a manifest before its
    artifact is complete. Links to directories are not followed, so a link cycle cannot trap the walk.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"interventions directory {root} does not exist")
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        if MANIFEST_NAME in files:
            found.append(Path(directory))
    return sorted(found)


def files_outside(directory: str | Path, root: str | Path) -> list[str]:
    """The artifact files of `directory` that resolve, through links, to somewhere outside `root`."""
    root = Path(root).resolve()
    return [name for name in ARTIFACT_FILES if not (Path(directory) / name).resolve().is_relative_to(root)]


def discover_interventions(
    root: str | Path,
    languages: list[str] | None = None,
    fingerprint: dict | None = None,
    *,
    within_root: bool = False,
) -> dict[str, Path]:
    """Source language (FLORES code) -> artifact directory, for the artifacts `find_artifact_dirs` finds.

    With `fingerprint`, artifacts fitted on another model are skipped (one root may hold several
    models' artifacts); with `within_root`, so are artifacts whose files link outside `root` (the
    server loads nothing from outside its root). Two artifacts for one language are an error, and so
    is a language of `languages` (None: every language found) without one. Manifests are validated;
    the tensors are read only by `load_intervention`.
    """
    root = Path(root)
    by_language: dict[str, Path] = {}
    other_models = 0
    for directory in find_artifact_dirs(root):
        outside = files_outside(directory, root) if within_root else []
        if outside:
            logger.warning("lingosteer: skipping %s: %s link outside %s", directory, ", ".join(outside), root)
            continue
        manifest = _read_manifest(directory / MANIFEST_NAME)
        if fingerprint is not None:
            try:
                check_fingerprint(fingerprint, manifest["model"])
            except FingerprintMismatch:
                logger.info("lingosteer: skipping %s (fitted on another model)", directory)
                other_models += 1
                continue
        source = manifest["source"]
        if source in by_language:
            raise InterventionError(f"two interventions for {source} under {root}: {by_language[source]} "
                                    f"and {directory}; keep one")
        by_language[source] = directory
    if languages is None:
        return dict(sorted(by_language.items()))
    missing = [language for language in languages if language not in by_language]
    if missing:
        skipped = f"; {other_models} fitted on another model skipped" if other_models else ""
        raise FileNotFoundError(f"no intervention for {', '.join(missing)} under {root} "
                                f"(found: {', '.join(sorted(by_language)) or 'none'}{skipped})")
    return {language: by_language[language] for language in languages}


# ---- reading ------------------------------------------------------------------------


@dataclass(frozen=True)
class Intervention:
    """A validated artifact. Tensors are float32 torch tensors, keyed as in the file."""

    path: Path
    manifest: dict
    tensors: dict

    @property
    def source(self) -> str:
        return self.manifest["source"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def default_alpha(self) -> float:
        return float(self.manifest["default_alpha"])

    @property
    def serving(self) -> dict:
        """What a request naming only its language gets: {"alpha", "layers", "positions"}."""
        return dict(self.manifest["serving"])

    @property
    def evidence(self) -> dict | None:
        """How the serving defaults were chosen (None: not calibrated)."""
        return self.manifest.get("evidence")

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    def delta(self, layer: int):
        """(D, b) float32 for one model layer, such that W h + b - h = D h + b."""
        if layer not in self.manifest["layers"]:
            raise KeyError(f"layer {layer} is not in this intervention (layers {self.layers})")
        if self.manifest["parametrization"] == "lowrank":
            D = self.tensors[f"U.{layer}"] @ self.tensors[f"V.{layer}"]
        elif self.manifest["parametrization"] == "shift":
            D = self.tensors[f"b.{layer}"].new_zeros(self.hidden_size, self.hidden_size)
        else:
            D = self.tensors[f"W.{layer}"].clone()
            D.diagonal().sub_(1.0)
        return D, self.tensors[f"b.{layer}"]

    def apply(self, states: np.ndarray, layer: int, alpha: float | None = None) -> np.ndarray:
        """h + alpha (D h + b) for states [n, d] (numpy), as serving would compute it."""
        alpha = self.default_alpha if alpha is None else alpha
        D, b = self.delta(layer)
        states = np.asarray(states, dtype=np.float32)
        return states + alpha * (states @ D.numpy().T + b.numpy())


def load_intervention(
    path: str | Path,
    expected_fingerprint: dict | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Intervention:
    """Read and validate an artifact directory; raise an `InterventionError` subclass if unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise InterventionNotFoundError(f"{path} is not an intervention directory")
    manifest = _read_manifest(path / MANIFEST_NAME)
    if expected_fingerprint is not None:
        _check_model(expected_fingerprint, manifest["model"], path)

    matrices = path / MATRICES_NAME
    _check_safetensors_file(matrices, max_bytes)
    try:
        raw = load_file(str(matrices))
    except (SafetensorError, OSError, ValueError) as error:
        raise NotSafetensorsError(f"{matrices} is not a readable safetensors file: {error}") from None
    _check_tensors(raw, manifest, matrices)
    tensors = {name: tensor.float() for name, tensor in raw.items()}
    for name, tensor in tensors.items():
        if not bool(tensor.isfinite().all()):
            raise NonFiniteError(f"{matrices}: tensor {name} contains NaN or infinite values")
    return Intervention(path=path, manifest=manifest, tensors=tensors)


def _read_manifest(manifest_path: Path) -> dict:
    if not manifest_path.is_file():
        raise InterventionNotFoundError(f"{manifest_path.parent} has no {MANIFEST_NAME}: not an intervention artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{manifest_path} is not valid JSON: {error}") from None
    return _validated(manifest, manifest_path)


def set_serving_defaults(path: str | Path, serving: dict, evidence: dict) -> dict:
    """Record calibrated serving defaults and their evidence in an artifact's manifest (atomically).

    `default_alpha` follows the serving alpha, so that readers of version 1 fields agree.
    Returns the new manifest; refuses serving defaults the artifact cannot serve.
    """
    path = Path(path)
    manifest = _read_manifest(path / MANIFEST_NAME)
    manifest.update(format_version=FORMAT_VERSION, serving=serving, evidence=evidence,
                    default_alpha=float(serving["alpha"]))
    manifest = _validated(manifest, path / MANIFEST_NAME)
    with atomic_path(path / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o644)  # shared like the rest of the artifact, whatever the umask
    return manifest


def _check_model(expected: dict, recorded: dict, path: Path) -> None:
    try:
        check_fingerprint(expected, recorded)
    except FingerprintMismatch as error:
        raise FingerprintMismatchError(f"{path} was fitted on a different model: {error}") from None


def _check_safetensors_file(matrices: Path, max_bytes: int) -> None:
    if not matrices.is_file():
        others = sorted(p.name for p in matrices.parent.iterdir() if p.name != MANIFEST_NAME)
        hint = f" (found {others}; only safetensors is accepted)" if others else ""
        raise NotSafetensorsError(f"{matrices.parent} has no {MATRICES_NAME}{hint}")
    size = matrices.stat().st_size
    if size > max_bytes:
        raise NotSafetensorsError(f"{matrices} is {size} bytes, over the limit of {max_bytes}")
    with open(matrices, "rb") as f:
        head = f.read(8)
        kind = _sniff(head)
        if kind:
            raise NotSafetensorsError(f"{matrices} is {kind}, not safetensors; refusing to load it")
        if len(head) < 8:
            raise NotSafetensorsError(f"{matrices} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise NotSafetensorsError(f"{matrices} is not a safetensors file (impossible header length)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise NotSafetensorsError(f"{matrices} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError(f"{matrices} is not a safetensors file (header is not a JSON object)")


def _sniff(head: bytes) -> str | None:
    """Name a few formats people put where safetensors belongs."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if head[:2] == b"PK":
        return "a zip archive (torch.save format)"
    if head[:6] == b"\x93NUMPY":
        return "a numpy .npy file"
    return None


def _check_tensors(raw: dict, manifest: dict, matrices: Path) -> None:
    import torch

    d = manifest["hidden_size"]
    expected_dtype = getattr(torch, manifest["dtype"])
    rank = manifest.get("rank")
    shapes = {}
    for layer in manifest["layers"]:
        if manifest["parametrization"] == "lowrank":
            shapes[f"U.{layer}"] = (d, rank)
            shapes[f"V.{layer}"] = (rank, d)
        elif manifest["parametrization"] == "full":
            shapes[f"W.{layer}"] = (d, d)
        shapes[f"b.{layer}"] = (d,)
    missing = sorted(set(shapes) - set(raw))
    if missing:
        raise MissingTensorError(f"{matrices}: missing tensors {missing} for layers {manifest['layers']}")
    extra = sorted(set(raw) - set(shapes))
    if extra:
        raise UnexpectedTensorError(f"{matrices}: unexpected tensors {extra} not described by the manifest")
    for name, shape in shapes.items():
        if raw[name].dtype != expected_dtype:
            raise TensorDtypeError(f"{matrices}: tensor {name} is {raw[name].dtype}, manifest says {manifest['dtype']}")
        if tuple(raw[name].shape) != shape:
            raise ShapeMismatchError(
                f"{matrices}: tensor {name} has shape {tuple(raw[name].shape)}, expected {shape} (hidden size {d})"
            )
