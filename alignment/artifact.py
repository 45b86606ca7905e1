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
Format version 2 added both; version 3 stores the alpha once, in `serving` (versions 1
and 2 also had `default_alpha`). Older manifests still load: version 1 with serving
{default_alpha, every layer, "last"} and no evidence (what version 1 served), version 2
with its serving alpha (which `set_serving_defaults` kept equal to `default_alpha`).

The artifact's version is the content hash of its files (`artifact_version`): the
loaded version, stored scores and the name of an uploaded copy all use it.

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lingosteer.files import atomic_path, sha256_files
from lingosteer.fingerprint import FingerprintMismatch, check_fingerprint
from lingosteer.validation import first_problem

FORMAT = "lingosteer.intervention"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
MATRICES_NAME = "matrices.safetensors"
ARTIFACT_FILES = (MANIFEST_NAME, MATRICES_NAME)
FORMULA = "h' = h + alpha * (W h + b - h)"
ALPHA_LIMIT = 10.0  # |alpha| of any manifest, request or calibration grid: the one bound of what alpha may be
PARAMETRIZATIONS = ("full", "lowrank", "shift")
# Every position mode, the one table the artifact's serving defaults, the plugin, the server and
# the benchmark read: mode -> the [start, end) positions it steers in a prompt of n tokens whose
# first `first` tokens are a leading BOS (left alone: the maps were fitted on sentence tokens,
# never on BOS). end None: every token after the prompt too (generated ones; in a scoring
# request, the option's).
POSITION_MODES: dict[str, Callable[[int, int], tuple[int, int | None]]] = {
    "last": lambda n, first: (n - 1, n),  # INCLINE's token, the one the answer is predicted from
    "prompt": lambda n, first: (first, n),
    "all": lambda n, first: (first, None),
}
DEFAULT_POSITIONS = "last"
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
    """What a request that names only its language gets; alpha 0 means off.

    Also a candidate of the calibration gate (`evaluation.calibration.search_space`): frozen, so
    that candidates key the tables of their scores.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    alpha: Annotated[float, Field(ge=-ALPHA_LIMIT, le=ALPHA_LIMIT,
                                  description="0 means off: the calibration found no clear gain")]
    layers: Annotated[tuple[int, ...], Field(min_length=1, description="the layers steered, a subset of the "
                                                                       "artifact's")]
    positions: Literal[tuple(POSITION_MODES)] = Field(
        description="the tokens steered: the last prompt token (INCLINE), every prompt token, or every prompt and "
                    "generated token (a leading BOS never)")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_from_json(cls, layers: Any) -> Any:
        """JSON has no tuples: a manifest's list of layers is the tuple."""
        return tuple(layers) if isinstance(layers, list) else layers

    def describe(self) -> str:
        layers = f"{self.layers[0]}-{self.layers[-1]}" if len(self.layers) > 1 else str(self.layers[0])
        return f"alpha {self.alpha:+g}, layers {layers}, positions {self.positions}"

    def weakness(self) -> tuple:
        """The gate's tie-break, weakest first: smaller |alpha|, fewer layers, 'last', then the negative alpha."""
        return abs(self.alpha), len(self.layers), self.positions != "last", self.alpha


class Evidence(BaseModel):
    """How `lingosteer align build` chose the serving defaults (`evaluation.serving_defaults` writes it).

    Fields it does not name are kept, so that a newer writer's evidence still loads.
    """

    model_config = ConfigDict(strict=True, extra="allow")

    task: str
    file: str = Field(description="the calibration file")
    items: int = Field(description="its first `items` items were the calibration items")
    plain_accuracy: float
    cross_validated_accuracy: float = Field(description="held-out steered accuracy: each item scored under a "
                                                        "candidate chosen without it (other folds, or for a shared "
                                                        "design the other languages)")
    delta: float = Field(description="cross-validated minus plain accuracy")
    delta_ci95: Annotated[list[float], Field(min_length=2, max_length=2)] | None = Field(
        None, description="paired bootstrap 95% CI of `delta` (null: the design tests no such interval)")
    adopted: bool = Field(description="whether the steered configuration cleared the gate")
    fold_choices: list[str] = Field(default_factory=list, description="the candidate chosen for each CV fold")
    candidate_accuracy: dict[str, float] = Field(description="each candidate (`ServingDefaults.describe()`) on "
                                                             "every calibration item")
    rule: str
    date: str
    engine: dict[str, Any]
    summary: str = Field(description="one line for people: the gain, its CI and the verdict")
    # Written since the gate's designs (#34); null in older manifests.
    design: str | None = Field(None, description="the gate's design (`evaluation.gate_designs.DESIGNS`)")
    languages: list[str] | None = Field(None, description="the languages the design decided together")
    discordance: float | None = Field(
        None, description="share of calibration items whose correctness under a candidate differs from plain, "
                          "averaged over the design's candidates (over all languages decided together)")
    minimum_detectable_gain: float | None = Field(
        None, description="points: the smallest true gain the design adopts in 80% of simulated builds of this "
                          "size and discordance (`evaluation.gate_power`); null: above every gain simulated")
    decision: str | None = Field(None, description="the verdict in words, with the detectable gain when off")


class TaskItems(BaseModel):
    """Benchmark items a map was fitted on: the benchmark refuses to evaluate them with it."""

    model_config = ConfigDict(strict=True, extra="forbid")

    file: str = Field(description="the task file's name, e.g. val.sw.jsonl")
    ranges: list[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        description="[start, end) item index ranges")


class FitData(BaseModel):
    """What a map was fitted on (`alignment.fitting.write_fit` writes it).

    Fields it does not name are kept: older manifests named their first source's fields at the top.
    """

    model_config = ConfigDict(strict=True, extra="allow")

    sources: list[dict[str, Any]] = Field(
        default_factory=list, description="each parallel source: its corpus and how many pairs it gave, and for a "
                                          "`--data` spec the spec and what `ParallelSource.describe()` says")
    num_pairs: int | None = None
    num_heldout: int | None = Field(None, description="pairs held out to choose lambda")
    max_pairs: int | None = None
    code_switched: bool = False
    recipe: str | None = Field(None, description="the recipe's name, or the script that fitted it")
    task_items: TaskItems | None = None


class InterventionManifest(BaseModel):
    """manifest.json, format versions 1 to 3 (versions 1 and 2 are read as the version 3 they stand for).

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
    bias: bool | None = None  # absent in the oldest manifests
    standardise: bool = False  # ridge on z-scores; absent in older manifests
    lambdas: list[float | None]
    serving: ServingDefaults
    evidence: Evidence | None = None
    dtype: Literal[DTYPES]
    fit_data: FitData
    metrics: dict[str, Any]
    created: str

    @model_validator(mode="before")
    @classmethod
    def _one_alpha(cls, data: Any) -> Any:
        """Versions 1 and 2 also stored `default_alpha`; version 1 had no serving defaults, and served
        default_alpha at every layer, at the last token. Version 3 keeps the alpha in `serving` only."""
        if not isinstance(data, dict) or data.get("format_version") not in (1, 2):
            return data
        data = dict(data)
        default_alpha = data.pop("default_alpha", None)
        if data["format_version"] == 1 and "serving" not in data:
            data.update(serving={"alpha": default_alpha, "layers": data.get("layers"), "positions": "last"},
                        evidence=None)
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


def _validated(manifest: Any, manifest_path: Path) -> InterventionManifest:
    """The manifest as its model reads it (versions 1 and 2 migrated), or the `InterventionError` that says why not."""
    try:
        return InterventionManifest.model_validate(manifest)
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
    fit_data: FitData | dict,
    metrics: dict | None = None,
    dtype: str = "float32",
    form: str = "map",
    alpha: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write a solved `LinearAligner` as an artifact directory, atomically.

    `layers[i]` is the model layer of the aligner's i-th fitted map. It serves `alpha` at
    every layer, at the last prompt token, until `set_serving_defaults` calibrates it. The
    directory appears complete or not at all; an existing one is replaced only with `overwrite`.
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
    layers = [int(layer_index) for layer_index in layers]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": fingerprint,
        "source": source,
        "target": target,
        "layers": layers,
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
        "serving": {"alpha": float(alpha), "layers": layers, "positions": "last"},
        "evidence": None,
        "dtype": dtype,
        "fit_data": fit_data.model_dump(mode="json", exclude_none=True) if isinstance(fit_data, FitData) else fit_data,
        "metrics": metrics or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # What is written is what loads: a field the model refuses fails here, before anything is on disk.
    manifest = _validated(manifest, out_dir / MANIFEST_NAME)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(staging / MATRICES_NAME))
        (staging / MANIFEST_NAME).write_text(_manifest_json(manifest))
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
    skip_invalid: bool = False,
) -> dict[str, Path]:
    """Source language (FLORES code) -> artifact directory, for the artifacts `find_artifact_dirs` finds.

    With `fingerprint`, artifacts fitted on another model are skipped (one root may hold several
    models' artifacts); with `within_root`, so are artifacts whose files link outside `root` (the
    server loads nothing from outside its root). Two artifacts for a language of `languages` (None: every
    language found) are an error, and so is a language of `languages` without one. Manifests are validated
    (with `skip_invalid`, an invalid one is skipped with a log line instead of raising: a server looking
    for one language must not be stopped by another's broken artifact); the tensors are read only by
    `load_intervention`.
    """
    root = Path(root)
    by_language: dict[str, Path] = {}
    second: dict[str, Path] = {}  # a language's second artifact: an error if the language is asked for
    other_models = 0
    for directory in find_artifact_dirs(root):
        outside = files_outside(directory, root) if within_root else []
        if outside:
            logger.warning("lingosteer: skipping %s: %s link outside %s", directory, ", ".join(outside), root)
            continue
        try:
            manifest = read_manifest(directory)
        except InterventionError as error:
            if not skip_invalid:
                raise
            logger.warning("lingosteer: skipping %s: %s", directory, error)
            continue
        if fingerprint is not None:
            try:
                check_fingerprint(fingerprint, manifest.model)
            except FingerprintMismatch:
                logger.info("lingosteer: skipping %s (fitted on another model)", directory)
                other_models += 1
                continue
        source = manifest.source
        if source in by_language:
            second.setdefault(source, directory)
            continue
        by_language[source] = directory
    for source in sorted(second) if languages is None else [code for code in languages if code in second]:
        raise InterventionError(f"two interventions for {source} under {root}: {by_language[source]} "
                                f"and {second[source]}; keep one")
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
    manifest: InterventionManifest
    tensors: dict

    @property
    def source(self) -> str:
        return self.manifest.source

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.layers)

    @property
    def serving(self) -> ServingDefaults:
        """What a request naming only its language gets."""
        return self.manifest.serving

    @property
    def evidence(self) -> Evidence | None:
        """How the serving defaults were chosen (None: not calibrated)."""
        return self.manifest.evidence

    @property
    def fit_data(self) -> FitData:
        return self.manifest.fit_data

    @property
    def hidden_size(self) -> int:
        return self.manifest.hidden_size

    def delta(self, layer: int):
        """(D, b) float32 for one model layer, such that W h + b - h = D h + b."""
        if layer not in self.manifest.layers:
            raise KeyError(f"layer {layer} is not in this intervention (layers {self.layers})")
        if self.manifest.parametrization == "lowrank":
            D = self.tensors[f"U.{layer}"] @ self.tensors[f"V.{layer}"]
        elif self.manifest.parametrization == "shift":
            D = self.tensors[f"b.{layer}"].new_zeros(self.hidden_size, self.hidden_size)
        else:
            D = self.tensors[f"W.{layer}"].clone()
            D.diagonal().sub_(1.0)
        return D, self.tensors[f"b.{layer}"]

    def apply(self, states: np.ndarray, layer: int, alpha: float | None = None) -> np.ndarray:
        """h + alpha (D h + b) for states [n, d] (numpy), as serving would compute it (alpha: the serving alpha)."""
        alpha = self.serving.alpha if alpha is None else alpha
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
    manifest = read_manifest(path)
    if expected_fingerprint is not None:
        _check_model(expected_fingerprint, manifest.model, path)

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


def artifact_version(path: str | Path) -> str:
    """Content hash of the artifact files: equal files give the same version everywhere."""
    return sha256_files(*(Path(path) / name for name in ARTIFACT_FILES))[:16]


def _manifest_json(manifest: InterventionManifest) -> str:
    return json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"


def read_manifest(path: str | Path) -> InterventionManifest:
    """The validated manifest of the artifact directory `path`, without reading its tensors."""
    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise InterventionNotFoundError(f"{manifest_path.parent} has no {MANIFEST_NAME}: not an intervention artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{manifest_path} is not valid JSON: {error}") from None
    return _validated(manifest, manifest_path)


def set_serving_defaults(path: str | Path, serving: ServingDefaults, evidence: Evidence) -> InterventionManifest:
    """Record calibrated serving defaults and their evidence in an artifact's manifest (atomically),
    in the current format version. Returns the new manifest; refuses serving defaults the artifact
    cannot serve."""
    path = Path(path)
    manifest = read_manifest(path).model_dump(mode="json")
    manifest.update(format_version=FORMAT_VERSION, serving=serving.model_dump(mode="json"),
                    evidence=evidence.model_dump(mode="json"))
    manifest = _validated(manifest, path / MANIFEST_NAME)
    with atomic_path(path / MANIFEST_NAME) as tmp:
        tmp.write_text(_manifest_json(manifest))
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


def _check_tensors(raw: dict, manifest: InterventionManifest, matrices: Path) -> None:
    import torch

    d = manifest.hidden_size
    expected_dtype = getattr(torch, manifest.dtype)
    rank = manifest.rank
    shapes = {}
    for layer in manifest.layers:
        if manifest.parametrization == "lowrank":
            shapes[f"U.{layer}"] = (d, rank)
            shapes[f"V.{layer}"] = (rank, d)
        elif manifest.parametrization == "full":
            shapes[f"W.{layer}"] = (d, d)
        shapes[f"b.{layer}"] = (d,)
    missing = sorted(set(shapes) - set(raw))
    if missing:
        raise MissingTensorError(f"{matrices}: missing tensors {missing} for layers {manifest.layers}")
    extra = sorted(set(raw) - set(shapes))
    if extra:
        raise UnexpectedTensorError(f"{matrices}: unexpected tensors {extra} not described by the manifest")
    for name, shape in shapes.items():
        if raw[name].dtype != expected_dtype:
            raise TensorDtypeError(f"{matrices}: tensor {name} is {raw[name].dtype}, manifest says {manifest.dtype}")
        if tuple(raw[name].shape) != shape:
            raise ShapeMismatchError(
                f"{matrices}: tensor {name} has shape {tuple(raw[name].shape)}, expected {shape} (hidden size {d})"
            )
