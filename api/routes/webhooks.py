"""Webhooks: the tenant's signing secret (read, rotate) and the deliveries of its jobs' events.

Jobs subscribe with ``webhook_url`` / ``webhook_events`` in POST /train or /evaluate
(``job_webhook`` checks them); api/core/webhooks.py sends the events.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from sqlalchemy import select

from api.core.db.models import Job, WebhookDelivery
from api.core.settings import Settings
from api.core.webhooks import SIGNATURE_HEADER, WebhookURLError, check_events, check_url, tenant_secret
from api.deps import SessionDep, TenantDep
from api.routes.common import AUTH_ERRORS
from api.schemas import JobWebhook, WebhookDeliveryOut, WebhookSecretOut

router = APIRouter(prefix="/webhooks", tags=["webhooks"], responses=AUTH_ERRORS)


def job_webhook(body: JobWebhook, settings: Settings) -> dict[str, object]:
    """The Job columns for a request's webhook fields; 422 for a URL the SSRF check refuses."""
    if body.webhook_url is None:
        if body.webhook_events is not None:
            raise HTTPException(422, "webhook_events needs webhook_url")
        return {}
    try:
        check_url(body.webhook_url, allow_private=settings.webhook_allow_private)
    except WebhookURLError as exc:
        raise HTTPException(422, f"webhook_url {exc}") from None
    return {"webhook_url": body.webhook_url, "webhook_events": check_events(body.webhook_events)}


def _secret(session, tenant, response: Response, rotate: bool) -> WebhookSecretOut:
    secret = tenant_secret(session, tenant, rotate=rotate)
    session.commit()
    response.headers["Cache-Control"] = "no-store"
    return WebhookSecretOut(secret=secret, header=SIGNATURE_HEADER)


@router.get("/secret", response_model=WebhookSecretOut, summary="This tenant's webhook signing secret")
def read_webhook_secret(session: SessionDep, tenant: TenantDep, response: Response) -> WebhookSecretOut:
    """Created on first use. Verify each delivery's signature with it (docs/service.md)."""
    return _secret(session, tenant, response, rotate=False)


@router.post("/secret/rotate", response_model=WebhookSecretOut, summary="Replace the webhook signing secret")
def rotate_webhook_secret(session: SessionDep, tenant: TenantDep, response: Response) -> WebhookSecretOut:
    """Every delivery from now on, retries included, is signed with the new secret."""
    return _secret(session, tenant, response, rotate=True)


@router.get("/deliveries", response_model=list[WebhookDeliveryOut], summary="Webhook deliveries, newest first")
def list_webhook_deliveries(
    session: SessionDep,
    tenant: TenantDep,
    job_id: Annotated[str | None, Query(max_length=32, description="only this job's")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[WebhookDeliveryOut]:
    return deliveries(session, tenant.id, job_id=job_id, limit=limit)


def deliveries(session, tenant_id: str, *, job_id: str | None = None, limit: int = 100) -> list[WebhookDeliveryOut]:
    """The tenant's deliveries (of one job's events, with ``job_id``), newest first."""
    query = (select(WebhookDelivery).join(Job, Job.id == WebhookDelivery.job_id)
             .where(Job.tenant_id == tenant_id))
    if job_id is not None:
        query = query.where(WebhookDelivery.job_id == job_id)
    rows = session.scalars(query.order_by(WebhookDelivery.created_at.desc()).limit(limit))
    return [WebhookDeliveryOut.model_validate(row) for row in rows]
