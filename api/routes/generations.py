"""Generation requests: ``POST /generations`` answers 202 at once; follow with GET, SSE or the PNGs.

The synchronous ``POST /generate`` (routes/generate.py) is a convenience on top of the same
``submit_generation``. Caps per tenant (requests pending, and their summed cost: steps x width x
height x images) answer 429 with ``Retry-After``; queue position counts the requests queued
before this one.
"""

from __future__ import annotations

import json
import math
import secrets
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse

from api.core.celery import TASK_GENERATE
from api.core.db.models import Adapter, GenerationRequest, utcnow
from api.core.db.session import session_scope
from api.core.settings import Settings
from api.core.storage import GENERATIONS, ArtifactStore
from api.deps import CeleryDep, SessionDep, SettingsDep, StoreDep, TenantDep, TenantRefDep, get_owned
from api.routes.common import AUTH_ERRORS, errors, poll_stream
from api.schemas import AdapterChoice, GenerateRequest, GenerationOut

router = APIRouter(prefix="/generations", tags=["generate"], responses=AUTH_ERRORS)

PENDING = ("queued", "running")
FINAL = ("succeeded", "failed", "timeout")
EVENTS_POLL_S = 0.25
_FALLBACK = {"steps": 30, "width": 512, "height": 512}  # what a model without a defaults file uses


def submit_generation(session: Session, tenant, settings: Settings, celery, body: GenerateRequest) -> GenerationRequest:
    """Check the request against the limits and the tenant's caps, store it, queue the task."""
    limits = [
        ("width", body.width, settings.max_image_size, "STYLEINJECT_MAX_IMAGE_SIZE"),
        ("height", body.height, settings.max_image_size, "STYLEINJECT_MAX_IMAGE_SIZE"),
        ("steps", body.steps, settings.max_inference_steps, "STYLEINJECT_MAX_INFERENCE_STEPS"),
        ("num_images", body.num_images, settings.max_num_images, "STYLEINJECT_MAX_NUM_IMAGES"),
        ("adapters", len(body.choices()), settings.max_adapters_per_request, "STYLEINJECT_MAX_ADAPTERS_PER_REQUEST"),
    ]
    for name, value, limit, env in limits:
        if value is not None and value > limit:
            raise HTTPException(422, f"{name} must be <= {limit} on this server ({env})")
    choices = body.choices()
    if len({c.id for c in choices}) != len(choices):
        raise HTTPException(422, "adapters: each adapter may appear once (combine weights into one scale)")
    bases = set()
    for choice in choices:
        bases.add(get_owned(session, Adapter, choice.id, tenant).base_model)
    if len(bases) > 1:
        raise HTTPException(422, f"adapters: all adapters of one request must share a base model; these were "
                                 f"trained on {sorted(bases)}")
    base_model = bases.pop() if bases else settings.resolved_base_model()
    cost = _cost(body, base_model)
    _check_caps(session, tenant.id, settings, cost)

    params = body.model_dump(exclude={"adapters", "adapter_id", "adapter_scale"})
    params["seed"] = body.seed if body.seed is not None else secrets.randbelow(2**31)
    params["adapters"] = [c.model_dump() for c in choices]
    request = GenerationRequest(tenant_id=tenant.id, adapter_id=choices[0].id if choices else None,
                                params=params, cost=cost)
    session.add(request)
    session.commit()
    try:
        celery.send_task(TASK_GENERATE, args=[request.id])
    except Exception as exc:  # noqa: BLE001 - broker down
        request.status, request.error, request.error_code, request.finished_at = "failed", "could not queue", 503, utcnow()
        session.commit()
        raise HTTPException(503, f"could not queue the request (is the broker up?): {exc}") from None
    return request


def _cost(body: GenerateRequest, base_model: str) -> int:
    """steps x width x height x images, unset values taken from the model's defaults file if it has one."""
    defaults = dict(_FALLBACK)
    try:
        from styleinject.serving.defaults import read_generation_defaults

        defaults.update(read_generation_defaults(base_model))
    except (OSError, ValueError):
        pass  # a hub id or an unreadable file: the SD 1.5 fallback; the worker reports real errors
    steps = body.steps or defaults["steps"]
    width, height = body.width or defaults["width"], body.height or defaults["height"]
    return int(steps * width * height * body.num_images)


def _fail_lost(session: Session, tenant_id: str, settings: Settings) -> None:
    """Requests left running by a worker that died never finish: past the generate time limit they
    are failed, so they stop counting against the tenant's caps."""
    cutoff = utcnow() - timedelta(seconds=settings.generate_time_limit_s + 60)
    session.execute(update(GenerationRequest)
                    .where(GenerationRequest.tenant_id == tenant_id, GenerationRequest.status == "running",
                           GenerationRequest.started_at < cutoff)
                    .values(status="failed", error="the worker running this request was lost; submit it again",
                            error_code=500, finished_at=utcnow()))


def _check_caps(session: Session, tenant_id: str, settings: Settings, cost: int) -> None:
    _fail_lost(session, tenant_id, settings)
    pending, pending_cost = session.execute(
        select(func.count(), func.coalesce(func.sum(GenerationRequest.cost), 0))
        .where(GenerationRequest.tenant_id == tenant_id, GenerationRequest.status.in_(PENDING))
    ).one()
    if cost > settings.tenant_max_generation_cost:
        raise HTTPException(422, f"this request's cost (steps x width x height x images = {cost}) is above the "
                                 f"per-tenant cap {settings.tenant_max_generation_cost} "
                                 "(STYLEINJECT_TENANT_MAX_GENERATION_COST): use fewer steps, pixels or images")
    over = None
    if pending >= settings.tenant_max_pending_generations:
        over = (f"you have {pending} generation requests queued or running, the most this server allows per "
                "tenant (STYLEINJECT_TENANT_MAX_PENDING_GENERATIONS)")
    elif pending_cost + cost > settings.tenant_max_generation_cost:
        over = (f"your queued and running requests already cost {pending_cost} (steps x width x height x images) "
                f"and this one {cost}: above the per-tenant cap {settings.tenant_max_generation_cost} "
                "(STYLEINJECT_TENANT_MAX_GENERATION_COST)")
    if over:
        retry = max(1, min(60, math.ceil(pending / 8)))
        raise HTTPException(429, f"{over}; retry after {retry} s", headers={"Retry-After": str(retry)})


def queue_position(session: Session, request: GenerationRequest) -> int | None:
    if request.status != "queued":
        return None
    return session.scalar(select(func.count()).where(GenerationRequest.status == "queued",
                                                     GenerationRequest.created_at < request.created_at))


def generation_out(session: Session, request: GenerationRequest, store: ArtifactStore) -> GenerationOut:
    images = []
    if request.status == "succeeded":
        images = [f"/generations/{request.id}/images/{name}" for name in store.files(GENERATIONS, request.id)
                  if name.endswith(".png")]
    return GenerationOut(
        id=request.id, status=request.status, queue_position=queue_position(session, request),
        progress=request.progress, error=request.error, images=images, params=request.params or {},
        adapters=[AdapterChoice(**a) for a in (request.params or {}).get("adapters", [])],
        created_at=request.created_at, started_at=request.started_at, finished_at=request.finished_at,
        duration_s=request.duration_s)


@router.post("", response_model=GenerationOut, status_code=202, responses=errors(404, 422, 429, 503),
             summary="Queue a generation; answers at once (202) with its id and queue position")
def create_generation(body: GenerateRequest, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
                      celery: CeleryDep, store: StoreDep, response: Response) -> GenerationOut:
    request = submit_generation(session, tenant, settings, celery, body)
    response.headers["Location"] = f"/generations/{request.id}"
    return generation_out(session, request, store)


@router.get("/{request_id}", response_model=GenerationOut, responses=errors(404),
            summary="A generation request: status, queue position, progress, image URLs")
def read_generation(request_id: str, session: SessionDep, tenant: TenantDep, store: StoreDep) -> GenerationOut:
    return generation_out(session, get_owned(session, GenerationRequest, request_id, tenant), store)


@router.get("/{request_id}/images/{name}", responses={200: {"content": {"image/png": {}}}, **errors(404)},
            response_class=Response, summary="One PNG of a finished request")
def read_generation_image(request_id: str, name: str, session: SessionDep, tenant: TenantDep,
                          store: StoreDep) -> Response:
    get_owned(session, GenerationRequest, request_id, tenant)
    if not name.endswith(".png") or name not in store.files(GENERATIONS, request_id):
        raise HTTPException(404, f"image {name} not found for generation {request_id}")
    with store.open_read(GENERATIONS, request_id, name) as handle:
        return Response(handle.read(), media_type="image/png")


@router.get("/{request_id}/events", responses={
    200: {"content": {"text/event-stream": {}},
          "description": "`status` events (the request as JSON) on every change, then one `end`"},
    **errors(404)}, summary="Follow a generation request (Server-Sent Events)")
async def stream_generation_events(request_id: str, request: Request, tenant: TenantRefDep,
                                   settings: SettingsDep, store: StoreDep) -> EventSourceResponse:
    def snapshot() -> dict[str, Any]:
        with session_scope(settings.database_url) as session:
            row = get_owned(session, GenerationRequest, request_id, tenant)
            return generation_out(session, row, store).model_dump(mode="json")

    return await poll_stream(request, snapshot, event="status", final=FINAL, interval_s=EVENTS_POLL_S,
                             changed=lambda g: (g["status"], g["queue_position"], json.dumps(g["progress"])))
