"""`GET /v1/interventions` and the admin routes that load, replace and unload them.

File work (resolving paths, writing and removing uploads) runs in a worker thread,
off the event loop that serves every other request.
"""

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from alignment.artifact import MANIFEST_NAME, MATRICES_NAME
from intervene_server import metrics
from intervene_server.artifacts import ArtifactPathError, remove_unused_uploads, resolve_in_root, store_upload
from intervene_server.auth import audit, require_token
from intervene_server.path_languages import language_or_404
from intervene_server.registry import InterventionRegistry, LoadError, NoEarlierVersionError
from intervene_server.schemas import (
    ErrorBody,
    HistoryEntry,
    InterventionList,
    LoadRequest,
    LoadResult,
    UnloadResult,
)


def public_router(registry: InterventionRegistry) -> APIRouter:
    router = APIRouter(tags=["lingosteer"])

    @router.get("/v1/interventions", response_model=InterventionList)
    async def list_interventions() -> InterventionList:
        """The interventions loaded now: language, version, layers, memory."""
        return InterventionList(interventions=sorted(registry.loaded.values(), key=lambda i: i.language))

    return router


def admin_router(
    registry: InterventionRegistry, token: str, upload_dir: Path, max_upload_bytes: int
) -> APIRouter:
    errors = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 411, 413, 422)}
    router = APIRouter(prefix="/admin", tags=["lingosteer admin"], responses=errors)
    caller = Annotated[str, Depends(require_token(token))]
    # Every change holds this lock from storing an upload to removing the uploads no longer loaded,
    # so a clean-up never deletes files that another change is about to load (identical uploads
    # share one directory, named by content hash). Loads are one at a time in the registry anyway.
    uploads_lock = asyncio.Lock()

    async def remove_unused(request: Request) -> None:
        # What is loaded, and what a rollback would load again.
        removed = await run_in_threadpool(remove_unused_uploads, upload_dir, registry.paths_to_keep())
        if removed:
            audit("uploads_removed", request, removed=removed)

    async def load(request: Request, path: Path, shown: str, pin: bool = False, source: str = "path") -> LoadResult:
        caller_address = request.client.host if request.client else "unknown"
        try:
            info, replaced = await registry.load(path, pin=pin, loaded_by=caller_address, source=source)
        except LoadError as error:
            metrics.INTERVENTION_EVENTS.labels(event="rejected", language="unknown").inc()
            audit("load_rejected", request, artifact=shown, error=str(error))
            raise HTTPException(422, f"intervention refused (the loaded version keeps serving): {error}") from None
        event = "swap" if replaced else "load"
        metrics.INTERVENTION_EVENTS.labels(event=event, language=info.language).inc()
        audit(event, request, artifact=shown, language=info.language, version=info.version, replaced=replaced)
        return LoadResult(loaded=info, replaced_version=replaced)

    @router.post("/interventions", response_model=LoadResult)
    async def load_from_path(body: LoadRequest, request: Request, _: caller) -> LoadResult:
        """Load or atomically replace an intervention from a directory inside the interventions root."""
        try:
            path = await run_in_threadpool(resolve_in_root, registry.root, body.path)
        except ArtifactPathError as error:
            audit("load_rejected", request, artifact=body.path, error=str(error))
            raise HTTPException(400, str(error)) from None
        async with uploads_lock:
            try:
                return await load(request, path, body.path, pin=body.pin)
            finally:
                await remove_unused(request)  # the upload it replaced, if any

    @router.post("/interventions/upload", response_model=LoadResult, openapi_extra=_UPLOAD_BODY)
    async def load_from_upload(request: Request, _: caller) -> LoadResult:
        """Upload an artifact (manifest.json + matrices.safetensors, multipart) and load it."""
        # Parsed here, after the size check, rather than by FastAPI before it. Starlette parses on the
        # event loop, but cheaply: python-multipart finds part boundaries with bytes.find (about 1 ms per
        # MB, one received chunk at a time) and file data past 1 MB goes to a temporary file in a thread.
        _check_declared_size(request, max_upload_bytes)
        async with request.form(max_files=2, max_fields=0) as form:
            files = {name: form.get(name) for name in ("manifest", "matrices")}
            missing = [name for name, part in files.items() if not isinstance(part, UploadFile)]
            if missing:
                raise HTTPException(400, f"multipart upload lacks the file part(s) {missing}")
            manifest_bytes = await _read_limited(files["manifest"], max_upload_bytes)
            matrices_bytes = await _read_limited(files["matrices"], max_upload_bytes - len(manifest_bytes))
        async with uploads_lock:
            path = await run_in_threadpool(store_upload, upload_dir, manifest_bytes, matrices_bytes)
            try:
                return await load(request, path, f"upload {path.name}", source="upload")
            finally:
                await remove_unused(request)  # this upload if it was refused, and the upload it replaced

    @router.delete("/interventions/{language}", response_model=UnloadResult)
    async def unload(language: str, request: Request, _: caller) -> UnloadResult:
        """Unload the intervention for a language; requests already running keep their version."""
        code = language_or_404(language, registry.loaded, "languages with a loaded intervention")
        async with uploads_lock:
            version = await registry.unload(code)
            await remove_unused(request)
        metrics.INTERVENTION_EVENTS.labels(event="unload", language=code).inc()
        audit("unload", request, language=code, version=version)
        return UnloadResult(language=code, version=version)

    @router.post("/interventions/{language}/rollback", response_model=LoadResult)
    async def rollback(language: str, request: Request, _: caller) -> LoadResult:
        """Load the version of a language that was loaded before its current one (409 if there is none)."""
        code = language_or_404(language, registry.loaded, "languages with a loaded intervention")
        async with uploads_lock:
            try:
                previous = registry.previous(code)
            except NoEarlierVersionError as error:
                raise HTTPException(409, str(error)) from None
            try:
                return await load(request, registry.root / previous.path, previous.path,
                                  pin=registry.loaded[code].pinned, source="rollback")
            finally:
                await remove_unused(request)

    @router.get("/interventions/{language}/history", response_model=list[HistoryEntry])
    async def history(language: str, _: caller) -> list[HistoryEntry]:
        """Every load of a language since start, oldest first: version, path, who, when, how."""
        code = language_or_404(language, registry.history, "languages loaded since start")
        return registry.history[code]

    return router


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["manifest", "matrices"],
            "properties": {
                "manifest": {"type": "string", "format": "binary", "description": MANIFEST_NAME},
                "matrices": {"type": "string", "format": "binary", "description": MATRICES_NAME},
            },
        }}},
    }
}


def _check_declared_size(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        raise HTTPException(411, "uploads need a Content-Length header")
    if not declared.isdigit() or int(declared) > limit:
        raise HTTPException(413, f"upload larger than the limit of {limit} bytes")


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload larger than the limit of {limit} bytes")
    return data
