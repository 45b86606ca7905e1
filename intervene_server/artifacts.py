"""Where intervention artifacts may come from: the interventions root, or an upload.

A load by path must stay inside the root after resolving symlinks (no `..`, no
link pointing out). An upload (manifest.json + matrices.safetensors) is written
to the upload directory under its version (`alignment.artifact.artifact_version`,
the content hash the engine names it by), atomically, and then loaded
like any other artifact; the engine does all content validation. The upload
directory keeps only uploads that are loaded: the engine holds a loaded version's
tensors in memory, so a replaced or unloaded upload's files are removed.
"""

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from alignment.artifact import MANIFEST_NAME, MATRICES_NAME, artifact_version, files_outside

DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
UPLOAD_DIR_NAME = ".uploads"  # inside the root; hidden, so startup preloading skips it


class ArtifactPathError(ValueError):
    """A requested path lies outside the interventions root or is not an artifact."""


def resolve_in_root(root: Path, requested: str) -> Path:
    """The real artifact directory for `requested` (relative to the root, or absolute inside it)."""
    root = root.resolve()
    if "\x00" in requested:
        raise ArtifactPathError("path contains a NUL byte")
    candidate = Path(requested)
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise ArtifactPathError(f"{requested!r} is outside the interventions root")
        if not resolved.is_dir():
            raise ArtifactPathError(f"{requested!r} is not a directory in the interventions root")
        outside = files_outside(resolved, root)
        if outside:
            raise ArtifactPathError(f"{requested!r}: {', '.join(outside)} link outside the interventions root")
    except OSError as error:  # name too long, permission denied, ...
        raise ArtifactPathError(f"{requested!r}: {error.strerror or error}") from None
    except UnicodeEncodeError:  # e.g. a lone surrogate from JSON "\ud800"
        raise ArtifactPathError(f"{requested!r} is not a valid file name") from None
    return resolved


def store_upload(upload_dir: Path, manifest: bytes, matrices: bytes) -> Path:
    """Write an uploaded artifact as `<upload_dir>/<its version>/`, all or nothing."""
    upload_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=upload_dir))
    target = None
    try:
        (staging / MANIFEST_NAME).write_bytes(manifest)
        (staging / MATRICES_NAME).write_bytes(matrices)
        target = upload_dir / artifact_version(staging)
        if not target.is_dir():  # the same files, uploaded before, are that upload
            os.replace(staging, target)
    except OSError:
        # A concurrent upload of the same files may have got there first: that is this upload.
        if target is None or not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # still there only if the files were stored before
    return target


def remove_unused_uploads(upload_dir: Path, in_use: Iterable[Path]) -> list[str]:
    """Delete everything in `upload_dir` but the loaded uploads `in_use`; the names removed.

    The caller holds the uploads lock, so no upload is being stored or loaded meanwhile: what
    is left is a replaced, unloaded or refused upload, or staging left by a killed process.
    """
    if not upload_dir.is_dir():
        return []
    keep = {path.resolve() for path in in_use}
    removed = sorted(entry.name for entry in upload_dir.iterdir() if entry.resolve() not in keep)
    for name in removed:
        shutil.rmtree(upload_dir / name, ignore_errors=True)
    return removed
