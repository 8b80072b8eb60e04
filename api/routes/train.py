"""POST /train: write a job row, send ``worker.tasks.train`` by name (the API imports no torch)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from api.core.celery import TASK_TRAIN
from api.core.db.models import Dataset
from api.core.jobs import create_job, transition
from api.core.registry import resolve_model
from api.deps import CeleryDep, SessionDep, SettingsDep, TenantDep, get_owned
from api.routes.common import AUTH_ERRORS, errors, job_out
from api.routes.webhooks import job_webhook
from api.schemas import JobOut, TrainRequest

router = APIRouter(prefix="/train", tags=["jobs"], responses=AUTH_ERRORS)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=errors(404, 409, 422, 503),
    summary="Start a finetune, distill or dreambooth job",
)
def create_train_job(
    body: TrainRequest, session: SessionDep, tenant: TenantDep, settings: SettingsDep, celery: CeleryDep
) -> JobOut:
    webhook = job_webhook(body, settings)
    dataset = get_owned(session, Dataset, body.dataset_id, tenant)
    if dataset.status != "ready":
        raise HTTPException(409, f"dataset {dataset.id} is {dataset.status}"
                                 + (f": {dataset.error}" if dataset.error else "; retry when ready"))
    if dataset.kind == "distill" and body.kind != "distill":
        raise HTTPException(422, f"dataset {dataset.id} was validated for distill (prompts only); "
                                 "upload images with captions for finetune/dreambooth")
    if body.kind == "distill" and not body.teacher_model:
        raise HTTPException(422, "distill needs teacher_model (a registered model's name: GET /models)")
    if body.kind == "dreambooth" and not body.instance_prompt:
        raise HTTPException(422, "dreambooth needs instance_prompt (e.g. 'a photo of sks dog')")
    if body.steps > settings.max_train_steps:
        raise HTTPException(422, f"steps must be <= {settings.max_train_steps} "
                                 "(STYLEINJECT_MAX_TRAIN_STEPS)")
    params = body.model_dump(exclude_none=True, exclude={"webhook_url", "webhook_events"})
    # Models by registered name only: an unknown name is a 422 that reveals nothing about the
    # server's files or the hub, before anything is queued.
    for field in ("base_model", "teacher_model"):
        name = getattr(body, field)
        if name is None:
            continue
        source = resolve_model(session, name)
        if source is None:
            raise HTTPException(422, f"{field}: {name[:100]!r} is not a registered model; use a name from "
                                     "GET /models (an admin adds models with `styleinject model add`)")
        params[field], params[f"{field}_name"] = source, name
    params.setdefault("base_model", settings.resolved_base_model())
    job = create_job(session, tenant_id=tenant.id, kind=body.kind, dataset_id=dataset.id, params=params, **webhook)
    session.commit()
    # the job as accepted: a fast worker may start it before this response is written
    accepted = job_out(job)
    try:
        celery.send_task(TASK_TRAIN, args=[job.id])
    except Exception as exc:  # noqa: BLE001 - broker down: fail the job, tell the caller
        error = f"could not queue: {exc}"
        transition(session, job.id, "failed", expect=("queued",), values={"error": error},
                   data={"error": error})
        session.commit()
        raise HTTPException(503, f"could not queue the job (is the broker up?): {exc}") from None
    return accepted
