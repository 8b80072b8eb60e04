"""A train job's checkpoints: the validation grid of each, and promotion to an adapter."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse
from sqlalchemy import select

from api.checkpoints import GRID_NAME, promote, promoted_from
from api.core.db.models import Checkpoint, Job
from api.deps import SessionDep, StoreDep, TenantDep, get_owned
from api.routes.common import AUTH_ERRORS, adapter_out, errors
from api.schemas import AdapterDetail, EvalScoreOut, PromoteRequest

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=AUTH_ERRORS)


def _checkpoint(session, job: Job, step: int) -> Checkpoint:
    checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step))
    if checkpoint is None:
        kept = ", ".join(str(c.step) for c in job.checkpoints) or "none yet"
        raise HTTPException(404, f"job {job.id} has no checkpoint at step {step} (kept: {kept})")
    return checkpoint


@router.get("/{job_id}/checkpoints/{step}/samples.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "The checkpoint's validation grid: "
                             "a row per prompt, a column per seed"}, **errors(404)},
            summary="A checkpoint's validation sample grid")
def read_checkpoint_samples(job_id: str, step: int, session: SessionDep, tenant: TenantDep,
                            store: StoreDep) -> FileResponse:
    job = get_owned(session, Job, job_id, tenant)
    checkpoint = _checkpoint(session, job, step)
    try:
        grid = Path(store.localise(checkpoint.path)) / GRID_NAME
    except FileNotFoundError:
        grid = None
    if not checkpoint.samples or grid is None or not grid.is_file():
        raise HTTPException(404, f"checkpoint {step} of job {job_id} has no sample grid (train with "
                                 "checkpoint_samples, the service's default)")
    # a checkpoint of a step is rewritten only when a resumed run saves that step again
    return FileResponse(grid, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.post("/{job_id}/checkpoints/{step}/promote", status_code=status.HTTP_201_CREATED,
             response_model=AdapterDetail, responses=errors(404, 409, 410, 422),
             summary="Make an adapter of a checkpoint (it records the job and step it came from)")
def promote_checkpoint(job_id: str, step: int, session: SessionDep, tenant: TenantDep, store: StoreDep,
                       body: PromoteRequest | None = None) -> AdapterDetail:
    job = get_owned(session, Job, job_id, tenant)
    if job.kind == "evaluate":
        raise HTTPException(422, f"job {job_id} is an evaluation; promote a checkpoint of a training job")
    checkpoint = _checkpoint(session, job, step)
    existing = promoted_from(session, job, step)
    if existing is not None:
        raise HTTPException(409, f"checkpoint {step} of job {job_id} is adapter {existing.id} already "
                                 f"({existing.name})")
    try:
        adapter = promote(session, store, job, checkpoint, body.name if body else None)
    except FileNotFoundError as exc:
        session.rollback()
        raise HTTPException(410, f"{exc}; its files are missing from the artifact store") from None
    session.commit()
    session.refresh(adapter)
    return AdapterDetail(**adapter_out(adapter), checkpoints=[],
                         eval_scores=[EvalScoreOut.model_validate(s) for s in adapter.eval_scores])
