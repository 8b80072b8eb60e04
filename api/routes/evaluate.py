"""POST /evaluate: an evaluate job that scores one adapter (``worker.tasks.evaluate``)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from api.core.celery import TASK_EVALUATE
from api.core.db.models import Adapter
from api.core.jobs import create_job, transition
from api.deps import CeleryDep, SessionDep, SettingsDep, TenantDep, get_owned
from api.routes.common import AUTH_ERRORS, errors, job_out
from api.routes.webhooks import job_webhook
from api.schemas import EvaluateRequest, JobOut

router = APIRouter(prefix="/evaluate", tags=["jobs"], responses=AUTH_ERRORS)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=errors(404, 422, 503),
    summary="Score an adapter (scores land on GET /adapters/{id})",
)
def create_evaluation(body: EvaluateRequest, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
                      celery: CeleryDep) -> JobOut:
    webhook = job_webhook(body, settings)
    adapter = get_owned(session, Adapter, body.adapter_id, tenant)
    params = body.model_dump(exclude_none=True, exclude={"webhook_url", "webhook_events"})
    job = create_job(session, tenant_id=tenant.id, kind="evaluate", params=params | {"adapter_id": adapter.id},
                     **webhook)
    session.commit()
    # the job as accepted: a fast worker may start it before this response is written
    accepted = job_out(job)
    try:
        celery.send_task(TASK_EVALUATE, args=[job.id])
    except Exception as exc:  # noqa: BLE001 - broker down
        error = f"could not queue: {exc}"
        transition(session, job.id, "failed", expect=("queued",), values={"error": error},
                   data={"error": error})
        session.commit()
        raise HTTPException(503, f"could not queue the job (is the broker up?): {exc}") from None
    return accepted
