"""Shared route helpers: error responses for OpenAPI, row -> response conversions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Hashable
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import object_session
from sse_starlette import EventSourceResponse

from api.core.db.models import Adapter, Job
from api.core.registry import display_name
from api.checkpoints import checkpoint_outs
from api.schemas import AdapterOut, ErrorOut, JobOut


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: every listed status code returns an ErrorOut."""
    return {code: {"model": ErrorOut} for code in codes}


AUTH_ERRORS = errors(401)


def tenant_params(job: Job) -> dict[str, Any]:
    """The job's parameters as its tenant sent them: models by registered name, never the source
    path the worker loads (kept in the row under the same keys)."""
    params = dict(job.params or {})
    session = object_session(job)
    for field in ("base_model", "teacher_model"):
        submitted = params.pop(f"{field}_name", None)
        if field in params and session is not None:
            params[field] = display_name(session, params[field], submitted)
    return params


def job_out(job: Job) -> JobOut:
    if job.kind == "evaluate":
        adapter_id = job.params.get("adapter_id")
    else:
        adapter_id = job.adapter.id if job.adapter is not None else None
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,
        dataset_id=job.dataset_id,
        adapter_id=adapter_id,
        params=tenant_params(job),
        progress=job.progress,
        result=job.result,
        error=job.error,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        worker_id=job.worker_id,
        checkpoints=checkpoint_outs(job),
        webhook_url=job.webhook_url,
        webhook_events=job.webhook_events,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
    )


def adapter_base_model(adapter: Adapter) -> str:
    """The adapter's base model as tenants know it: the registered name, not the worker's path."""
    submitted = (adapter.job.params or {}).get("base_model_name") if adapter.job is not None else None
    return display_name(object_session(adapter), adapter.base_model, submitted)


def adapter_out(adapter: Adapter) -> dict[str, Any]:
    return AdapterOut(
        id=adapter.id,
        name=adapter.name,
        kind=adapter.kind,
        base_model=adapter_base_model(adapter),
        job_id=adapter.job_id,
        source_job_id=adapter.source_job_id,
        source_step=adapter.source_step,
        config=adapter.config or {},
        metadata=adapter.meta or {},
        size_bytes=adapter.size_bytes,
        created_at=adapter.created_at,
    ).model_dump()


async def poll_stream(request: Request, snapshot: Callable[[], dict[str, Any]], *, event: str,
                      changed: Callable[[dict[str, Any]], Hashable], final: tuple[str, ...],
                      interval_s: float) -> EventSourceResponse:
    """Server-Sent Events that poll ``snapshot`` (a short DB read, run in the thread pool): an
    ``event`` whenever ``changed(snapshot)`` differs, then ``end`` once its status is in ``final``.
    The first snapshot is read before the stream starts, so a 404 is a plain HTTP error."""
    first = await run_in_threadpool(snapshot)

    async def events():
        current, last = first, None
        while True:
            key = changed(current)
            if key != last:
                last = key
                yield {"event": event, "data": json.dumps(current)}
            if current["status"] in final:
                yield {"event": "end", "data": json.dumps(current)}
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(interval_s)
            current = await run_in_threadpool(snapshot)

    return EventSourceResponse(events(), ping=15)
