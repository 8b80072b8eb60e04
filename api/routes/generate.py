"""POST /generate: record the request, send ``worker.tasks.generate``, wait for its PNGs."""

from __future__ import annotations

import secrets

from celery.exceptions import TimeoutError as CeleryTimeout
from fastapi import APIRouter, HTTPException
from sqlalchemy import update

from api.core.celery import TASK_GENERATE
from api.core.db.models import Adapter, GenerationRequest, utcnow
from api.deps import CeleryDep, SessionDep, SettingsDep, TenantDep, get_owned
from api.routes.common import AUTH_ERRORS, errors
from api.schemas import GenerateOut, GenerateRequest

router = APIRouter(prefix="/generate", tags=["generate"], responses=AUTH_ERRORS)


@router.post(
    "",
    response_model=GenerateOut,
    responses=errors(404, 422, 500, 503, 504),
    summary="Generate images (Euler Ancestral), optionally with one of your adapters",
)
def create_generation(
    body: GenerateRequest, session: SessionDep, tenant: TenantDep, settings: SettingsDep, celery: CeleryDep
) -> GenerateOut:
    limits = [
        ("width", body.width, settings.max_image_size, "STYLEINJECT_MAX_IMAGE_SIZE"),
        ("height", body.height, settings.max_image_size, "STYLEINJECT_MAX_IMAGE_SIZE"),
        ("steps", body.steps, settings.max_inference_steps, "STYLEINJECT_MAX_INFERENCE_STEPS"),
        ("num_images", body.num_images, settings.max_num_images, "STYLEINJECT_MAX_NUM_IMAGES"),
    ]
    for name, value, limit, env in limits:
        if value is not None and value > limit:
            raise HTTPException(422, f"{name} must be <= {limit} on this server ({env})")
    if body.adapter_id is not None:
        get_owned(session, Adapter, body.adapter_id, tenant)
    params = body.model_dump()
    params["seed"] = body.seed if body.seed is not None else secrets.randbelow(2**31)
    request = GenerationRequest(tenant_id=tenant.id, adapter_id=body.adapter_id, params=params)
    session.add(request)
    session.commit()

    try:
        result = celery.send_task(TASK_GENERATE, args=[request.id])
    except Exception as exc:  # noqa: BLE001 - broker down
        _finish(session, request.id, "failed", f"could not queue: {exc}")
        raise HTTPException(503, f"could not queue the request (is the broker up?): {exc}") from None
    try:
        outcome = result.get(timeout=settings.generate_timeout_s, propagate=False)
    except CeleryTimeout:
        # The worker skips a request already marked timeout if it picks it up later.
        _finish(session, request.id, "timeout", "timed out waiting for a worker")
        raise HTTPException(
            504, f"no result within {settings.generate_timeout_s:g} s (STYLEINJECT_GENERATE_TIMEOUT_S);"
                 " the workers may be busy with training, retry later"
        ) from None
    result.forget()
    session.refresh(request)
    if not isinstance(outcome, dict) or request.status != "succeeded":
        message = request.error or f"generation failed: {outcome!r}"
        code = outcome.get("status_code", 500) if isinstance(outcome, dict) else 500
        raise HTTPException(code, message)
    return GenerateOut(
        id=request.id,
        images=outcome["images"],
        seed=params["seed"],
        width=outcome["width"],
        height=outcome["height"],
        steps=outcome["steps"],
        guidance_scale=outcome["guidance_scale"],
        adapter_id=body.adapter_id,
        adapter_scale=body.adapter_scale,
        duration_s=request.duration_s,
    )


def _finish(session, request_id: str, status: str, error: str) -> None:
    session.execute(
        update(GenerationRequest)
        .where(GenerationRequest.id == request_id, GenerationRequest.status.in_(("queued", "running")))
        .values(status=status, error=error, finished_at=utcnow())
    )
    session.commit()
