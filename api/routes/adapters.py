"""Adapters: list, read (with checkpoints and eval scores), download as zip, delete; LoRA files in
(``POST /adapters/import``) and out (``GET /adapters/{id}/export``).

LoRA conversion (``styleinject.interop``) is torch-free, so the API does it itself, in a worker
thread: a bad file is a 422 at once, listing the keys it cannot place, and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select
from starlette.background import BackgroundTask

from api.checkpoints import checkpoint_outs
from api.core.db.models import Adapter, new_id
from api.core.db.session import session_scope
from api.core.registry import resolve_model
from api.core.storage import ADAPTERS, UPLOADS
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep, get_owned
from api.routes.common import AUTH_ERRORS, adapter_out, errors
from api.schemas import AdapterDetail, AdapterOut, EvalScoreOut
from api.uploads import UploadError, receive_file, safe_filename, staged

router = APIRouter(prefix="/adapters", tags=["adapters"], responses=AUTH_ERRORS)


@router.get("", response_model=list[AdapterOut], summary="List your adapters, newest first")
def list_adapters(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[dict]:
    query = (
        select(Adapter)
        .where(Adapter.tenant_id == tenant.id)
        .order_by(Adapter.created_at.desc())
        .limit(limit)
        .offset(offset)
    )
    return [adapter_out(a) for a in session.scalars(query)]


@router.get("/{adapter_id}", response_model=AdapterDetail, responses=errors(404),
            summary="One adapter with its checkpoints and eval scores")
def read_adapter(adapter_id: str, session: SessionDep, tenant: TenantDep) -> AdapterDetail:
    adapter = get_owned(session, Adapter, adapter_id, tenant)
    return AdapterDetail(
        **adapter_out(adapter),
        checkpoints=[c for c in checkpoint_outs(adapter.job) if c.adapter_id == adapter.id] if adapter.job else [],
        eval_scores=[EvalScoreOut.model_validate(s) for s in adapter.eval_scores],
    )


@router.get(
    "/{adapter_id}/download",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {}}, "description":
                     "adapter_config.json + adapter_model.safetensors (no checkpoints)"},
               **errors(404, 410)},
    summary="Download the adapter folder as a zip",
)
def download_adapter(adapter_id: str, session: SessionDep, tenant: TenantDep, store: StoreDep) -> FileResponse:
    adapter = get_owned(session, Adapter, adapter_id, tenant)
    ref = store.locate(adapter.path)
    names = store.files(*ref) if ref is not None else []
    if not names:
        raise HTTPException(410, f"adapter {adapter_id}'s files are missing from the artifact store")
    fd, tmp = tempfile.mkstemp(suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            with store.open_read(*ref, name) as source, archive.open(name, "w") as target:
                while chunk := source.read(1 << 20):
                    target.write(chunk)
    return FileResponse(
        tmp,
        media_type="application/zip",
        filename=f"{adapter.name}.zip",
        background=BackgroundTask(os.unlink, tmp),
    )


@router.delete("/{adapter_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404),
               summary="Delete an adapter, its checkpoints, scores and files")
def delete_adapter(adapter_id: str, session: SessionDep, tenant: TenantDep, store: StoreDep) -> Response:
    adapter = get_owned(session, Adapter, adapter_id, tenant)
    ref = store.locate(adapter.path)  # None: a path outside the store is never deleted
    session.delete(adapter)
    session.commit()
    if ref is not None:
        store.delete(*ref)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- LoRA files in and out (docs/adapters.md "LoRA files in and out") --------------------------------

LORA_TYPES = "a LoRA .safetensors file (diffusers/PEFT or kohya format; pickled .ckpt/.pt/.bin are never read)"
_LORA_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description":
                            "UNet LoRA .safetensors: diffusers/PEFT keys (unet.<module>.lora_A.weight) or "
                            "kohya/A1111/ComfyUI keys (lora_unet_<module>.lora_down.weight, .alpha)"}}}}}}}


@router.post(
    "/import",
    status_code=status.HTTP_201_CREATED,
    response_model=AdapterOut,
    responses=errors(400, 413, 415, 422),
    openapi_extra=_LORA_BODY,
    summary="Import a LoRA file (multipart field `file`) as a LoRA-mode adapter",
)
async def import_adapter(
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
    name: Annotated[str, Query(min_length=1, max_length=255, description="The new adapter's name")],
    base_model: Annotated[str, Query(min_length=1, max_length=100,
                                     description="The registered model (GET /models) the LoRA was made for")],
) -> dict[str, Any]:
    def registered() -> str | None:
        with session_scope(settings.database_url) as session:
            return resolve_model(session, base_model)

    source = await run_in_threadpool(registered)
    if source is None:
        raise HTTPException(422, f"base_model: {base_model[:100]!r} is not a registered model; use a name from "
                                 "GET /models (an admin adds models with `styleinject model add`)")
    adapter_id = new_id()
    dest = store.path_for(ADAPTERS, adapter_id)
    async with staged(store, ADAPTERS, adapter_id):
        upload, original, _ = await receive_file(request, "file", store.path_for(UPLOADS, adapter_id),
                                                 settings.max_lora_upload_bytes, suffixes=(".safetensors",),
                                                 what="LoRA file", types=LORA_TYPES)
        config, meta, size = await run_in_threadpool(convert_lora, upload, original, dest, source, base_model)
        await run_in_threadpool(store.put_dir, ADAPTERS, adapter_id, dest)

    def create_row() -> dict[str, Any]:
        with session_scope(settings.database_url) as session:
            row = Adapter(id=adapter_id, tenant_id=tenant.id, name=name, kind="import", base_model=source,
                          path=str(dest), config=config, meta=meta, size_bytes=size)
            session.add(row)
            session.flush()
            return adapter_out(row)

    try:
        return await run_in_threadpool(create_row)
    except BaseException:
        store.delete(ADAPTERS, adapter_id)
        raise


def convert_lora(upload: Path, original: str, dest: Path, source: str, model_name: str
                 ) -> tuple[dict[str, Any], dict[str, str], int]:
    """Write the adapter folder for an uploaded LoRA file; (config, metadata + sha256, bytes).

    Names and shapes are checked against the base model's UNet when its source is a folder this
    process can read (the safetensors headers only); otherwise the worker checks the shapes when it
    first loads the adapter. Raises UploadError(422) naming the upload, never a server path.
    """
    import json

    from styleinject.adapters.config import CONFIG_NAME, WEIGHTS_NAME
    from styleinject.interop import LoraFormatError, import_lora
    from styleinject.interop.tensorfile import read_metadata

    try:
        # the file records the registered name: a server path never travels in a downloaded file
        import_lora(upload, dest, base_model=source if Path(source).is_dir() else None, base_model_name=model_name)
    except LoraFormatError as exc:
        message = str(exc).replace(str(upload), original).replace(source, model_name)
        raise UploadError(422, f"invalid LoRA file: {message}") from None
    weights = dest / WEIGHTS_NAME
    digest = hashlib.sha256()  # the engine's caches key adapters by id and content (worker.generation)
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    meta = read_metadata(weights) | {"sha256": digest.hexdigest()}
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    return json.loads((dest / CONFIG_NAME).read_text()), meta, size


@router.get(
    "/{adapter_id}/export",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description":
                     "the LoRA .safetensors file (diffusers: loads with pipe.load_lora_weights; kohya: "
                     "A1111, ComfyUI)"},
               **errors(404, 409, 410)},
    summary="Download a LoRA-mode adapter as a LoRA file (409 for DMA/STA adapters)",
)
def export_adapter(
    adapter_id: str,
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    format: Annotated[Literal["diffusers", "kohya"], Query(description="diffusers (default) or kohya")] = "diffusers",  # noqa: A002
) -> FileResponse:
    from styleinject.interop import LoraFormatError, export_lora

    adapter = get_owned(session, Adapter, adapter_id, tenant)
    try:
        local = store.localise(adapter.path)
    except FileNotFoundError:
        local = None
    if not local or not Path(local).is_dir():
        raise HTTPException(410, f"adapter {adapter_id}'s files are missing from the artifact store")
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        export_lora(local, tmp, format=format)
    except LoraFormatError as exc:
        os.unlink(tmp)
        raise HTTPException(409, str(exc).replace(str(local), f"adapter {adapter_id}")) from None
    except BaseException:
        os.unlink(tmp)
        raise
    return FileResponse(tmp, media_type="application/octet-stream",
                        filename=f"{safe_filename(adapter.name)}-{format}.safetensors",
                        background=BackgroundTask(os.unlink, tmp))
