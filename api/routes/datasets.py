"""Datasets: streamed upload with a size cap, then validation with the training engine's checks.

``styleinject.train.data`` (``safe_extract``, ``inspect_dataset``) is torch-free (numpy + PIL) and
the library's top-level imports are lazy, so the API validates uploads itself, in a worker thread,
importing the module on first use: the answer is immediate (no waiting behind a training job in
the embedded mode's single worker) and a bad upload is a 422 with the engine's message (in API
words: ``styleinject.errors.api_message``) that leaves nothing behind. The upload streams to the
artifact store's ``uploads/<id>``; archives are extracted with ``safe_extract`` into
``datasets/<id>/data`` and fully inspected there.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from api.core.db.models import Dataset, new_id
from api.core.db.session import session_scope
from api.core.storage import DATASETS, UPLOADS
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep, get_owned
from api.routes.common import AUTH_ERRORS, errors
from api.schemas import DatasetOut, TrainKind
from api.uploads import UploadError, library_error_message, receive_file, staged
from styleinject.names import ARCHIVE_SUFFIXES

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=AUTH_ERRORS)

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".zip/.tar/.tar.gz/.tgz of images + .txt captions or a "
                            "metadata.jsonl; for distill also a prompts .txt/.jsonl",
                        }
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    summary="Upload a dataset (multipart field `file`)",
    responses=errors(400, 413, 415, 422),
    openapi_extra=_UPLOAD_BODY,
)
async def create_dataset(
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
    kind: Annotated[TrainKind, Query(description="Training kind to validate for")] = "finetune",
    skip_bad: Annotated[bool, Query(description="Leave out unreadable or uncaptioned items instead of "
                                    "rejecting the upload (training leaves them out too)")] = False,
) -> Dataset:
    dataset_id = new_id()
    upload_dir = store.path_for(UPLOADS, dataset_id)
    dest = store.path_for(DATASETS, dataset_id)
    async with staged(store, DATASETS, dataset_id):
        upload, original, size = await receive_file(request, "file", upload_dir, settings.max_upload_bytes)
        data_path, info = await run_in_threadpool(validate_upload, upload, dest, kind, skip_bad,
                                                  settings.max_extract_ratio, settings.max_image_pixels)
        await run_in_threadpool(store.put_dir, DATASETS, dataset_id, dest)

    def create_row() -> Dataset:
        with session_scope(settings.database_url) as session:
            row = Dataset(id=dataset_id, tenant_id=tenant.id, name=original[:255], kind=kind,
                          status="ready", path=str(data_path), size_bytes=size, format=info.format,
                          num_items=info.num_items, has_teacher_text=info.has_teacher_text,
                          sha256=info.sha256, skip_bad=skip_bad)
            session.add(row)
            return row

    try:
        return await run_in_threadpool(create_row)
    except BaseException:
        store.delete(DATASETS, dataset_id)
        raise


def validate_upload(upload: Path, dest: Path, kind: str, skip_bad: bool = False,
                    max_ratio: float = 20.0, max_pixels: int | None = None) -> tuple[Path, Any]:
    """Extract (archives) into ``dest`` and run the engine's full validation.

    An archive may expand to at most ``max(max_ratio x its size, 1 MiB)`` (STYLEINJECT_MAX_EXTRACT_RATIO),
    counted while it is extracted: a bomb is refused before it fills the disk. An image above
    ``max_pixels`` (STYLEINJECT_MAX_IMAGE_PIXELS; the library's bound when None) is refused from its
    header, before it is decoded.

    Raises UploadError(422) with the engine's message in API words; ``dest`` is the caller's to remove.
    """
    from styleinject.train.data import DatasetError, inspect_dataset, safe_extract

    dest.mkdir(parents=True)
    try:
        if upload.name.lower().endswith(ARCHIVE_SUFFIXES):
            data_path = dest / "data"
            safe_extract(upload, data_path, max_ratio=max_ratio)
        else:
            data_path = dest / upload.name
            shutil.move(upload, data_path)
        bound = {} if max_pixels is None else {"max_pixels": max_pixels}
        return data_path, inspect_dataset(data_path, kind=kind, skip_bad=skip_bad, **bound)
    except DatasetError as exc:
        raise UploadError(422, f"invalid dataset: {library_error_message(exc)}") from None


@router.get("", response_model=list[DatasetOut], summary="List your datasets, newest first")
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[Dataset]:
    query = (
        select(Dataset)
        .where(Dataset.tenant_id == tenant.id)
        .order_by(Dataset.created_at.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(query))


@router.get("/{dataset_id}", response_model=DatasetOut, responses=errors(404),
            summary="One dataset and its validation result")
def read_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    return get_owned(session, Dataset, dataset_id, tenant)
