"""Adapters: list, read (with checkpoints and eval scores), download as zip, delete."""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.responses import FileResponse
from sqlalchemy import select
from starlette.background import BackgroundTask

from api.core.db.models import Adapter
from api.deps import SessionDep, StoreDep, TenantDep, get_owned
from api.routes.common import AUTH_ERRORS, adapter_out, errors
from api.schemas import AdapterDetail, AdapterOut, CheckpointOut, EvalScoreOut

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
        checkpoints=[CheckpointOut.model_validate(c) for c in adapter.checkpoints],
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
