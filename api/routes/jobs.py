"""Jobs: list, read, cancel (a DB flag the training loop polls), progress as Server-Sent Events."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from sqlalchemy import select, update
from sse_starlette import EventSourceResponse

from api.core.db.models import FINISHED, JOB_EVENT_KINDS, Job
from api.core.db.session import session_scope
from api.core.jobs import history, transition
from api.deps import SessionDep, SettingsDep, TenantDep, TenantRefDep, get_owned
from api.routes.common import AUTH_ERRORS, errors, job_out, poll_stream
from api.schemas import JobEventOut, JobHistoryOut, JobOut, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=AUTH_ERRORS)

EVENTS_POLL_S = 0.5


@router.get("", response_model=list[JobOut], summary="List your jobs, newest first")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[JobOut]:
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        query = query.where(Job.status == status)
    if kind is not None:
        query = query.where(Job.kind == kind)
    query = query.order_by(Job.created_at.desc()).limit(limit).offset(offset)
    return [job_out(job) for job in session.scalars(query)]


@router.get("/{job_id}", response_model=JobOut, responses=errors(404), summary="One job")
def read_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    return job_out(get_owned(session, Job, job_id, tenant))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=errors(404),
             summary="Cancel a job (a finished job is returned unchanged)")
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    job = get_owned(session, Job, job_id, tenant)
    if job.status not in FINISHED:
        # A running job stops at its next step (final checkpoint kept); a queued one ends now and
        # its task becomes a no-op. Conditional updates: the worker may be claiming it right now.
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        transition(session, job_id, "cancelled", expect=("queued",),
                   data={"reason": "cancelled before a worker started it"})
        session.commit()
        session.refresh(job)
    return job_out(job)


@router.get("/{job_id}/history", response_model=JobHistoryOut, responses=errors(404, 422),
            summary="A job's history: status changes, progress points, checkpoints, scores")
def read_job_history(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    kind: Annotated[list[str] | None, Query(description="Only these event kinds: "
                                            + ", ".join(JOB_EVENT_KINDS))] = None,
) -> JobHistoryOut:
    """Oldest first. Progress points are thinned on long jobs (at most a few hundred per job,
    evenly spaced, the first and newest kept); status changes, checkpoints and scores are all kept."""
    job = get_owned(session, Job, job_id, tenant)
    unknown = sorted(set(kind or ()) - set(JOB_EVENT_KINDS))
    if unknown:
        raise HTTPException(422, f"unknown event kind {', '.join(unknown)}; use {', '.join(JOB_EVENT_KINDS)}")
    events = history(session, job.id, kinds=kind)
    return JobHistoryOut(job_id=job.id, status=job.status,
                         events=[JobEventOut.model_validate(e) for e in events])


@router.get(
    "/{job_id}/events",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`progress` events (the job as JSON) on every change, then one `end`",
        },
        **errors(404),
    },
    summary="Follow a job's progress (Server-Sent Events)",
)
async def stream_job_events(
    job_id: str, request: Request, tenant: TenantRefDep, settings: SettingsDep
) -> EventSourceResponse:
    def snapshot() -> dict:
        with session_scope(settings.database_url) as session:
            return job_out(get_owned(session, Job, job_id, tenant)).model_dump(mode="json")

    return await poll_stream(request, snapshot, event="progress", final=FINISHED, interval_s=EVENTS_POLL_S,
                             changed=lambda j: (j["status"], j["progress"], j["error"], j["adapter_id"],
                                                json.dumps(j["checkpoints"], sort_keys=True)))
