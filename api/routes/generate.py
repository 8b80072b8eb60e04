"""POST /generate: the synchronous convenience over ``/generations`` (queue, wait, answer with PNGs).

The route is async and waits on the app's ``GenerationWaiter``: a waiting request holds neither a
worker thread nor a database connection (only the short steps before and after run in the
thread pool). Clients that would rather not wait use ``POST /generations`` (202) and poll or
follow its events.
"""

from __future__ import annotations

import base64

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import update

from api.core.db.models import GenerationRequest, utcnow
from api.core.db.session import session_scope
from api.core.storage import GENERATIONS
from api.deps import CeleryDep, SettingsDep, StoreDep, TenantRefDep
from api.routes.common import AUTH_ERRORS, errors
from api.routes.generations import submit_generation
from api.schemas import AdapterChoice, GenerateOut, GenerateRequest
from api.waiter import GenerationWaiter

router = APIRouter(prefix="/generate", tags=["generate"], responses=AUTH_ERRORS)


def waiter_for(request: Request) -> GenerationWaiter:
    waiter = getattr(request.app.state, "generation_waiter", None)
    if waiter is None:
        waiter = request.app.state.generation_waiter = GenerationWaiter(request.app.state.settings.database_url)
    return waiter


@router.post(
    "",
    response_model=GenerateOut,
    responses=errors(404, 422, 429, 500, 503, 504),
    summary="Generate images (Euler Ancestral) with zero, one or several of your adapters, and wait",
)
async def generate_and_wait(body: GenerateRequest, request: Request, tenant: TenantRefDep, settings: SettingsDep,
                            celery: CeleryDep, store: StoreDep) -> GenerateOut:
    def submit() -> tuple[str, dict]:
        with session_scope(settings.database_url) as session:
            row = submit_generation(session, tenant, settings, celery, body)
            return row.id, dict(row.params)

    request_id, params = await run_in_threadpool(submit)
    status = await waiter_for(request).wait(request_id, settings.generate_timeout_s)
    if status is None:
        await run_in_threadpool(_time_out, settings.database_url, request_id)
        raise HTTPException(504, f"no result within {settings.generate_timeout_s:g} s (STYLEINJECT_GENERATE_TIMEOUT_S);"
                                 f" the generate workers may be busy or down, retry later")

    def result() -> GenerateOut:
        with session_scope(settings.database_url) as session:
            row = session.get(GenerationRequest, request_id)
            if row.status != "succeeded":
                raise HTTPException(row.error_code or 500, row.error or f"generation {row.status}")
            names = [n for n in store.files(GENERATIONS, request_id) if n.endswith(".png")]
            images = []
            for name in sorted(names, key=lambda n: int(n.split(".")[0])):
                with store.open_read(GENERATIONS, request_id, name) as handle:
                    images.append(base64.b64encode(handle.read()).decode("ascii"))
            resolved = row.params
            choices = [AdapterChoice(**a) for a in resolved.get("adapters", [])]
            return GenerateOut(id=row.id, images=images, seed=resolved["seed"], width=resolved["width"],
                               height=resolved["height"], steps=resolved["steps"],
                               guidance_scale=resolved["guidance_scale"],
                               adapter_id=choices[0].id if len(choices) == 1 else None,
                               adapter_scale=choices[0].scale if len(choices) == 1 else 1.0,
                               adapters=choices, duration_s=row.duration_s)

    return await run_in_threadpool(result)


def _time_out(database_url: str, request_id: str) -> None:
    """Mark a request the client stopped waiting for (a worker that picks it up later skips it)."""
    with session_scope(database_url) as session:
        session.execute(update(GenerationRequest)
                        .where(GenerationRequest.id == request_id, GenerationRequest.status == "queued")
                        .values(status="timeout", error="timed out waiting for a worker", error_code=504,
                                finished_at=utcnow()))
