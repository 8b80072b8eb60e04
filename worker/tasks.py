"""Celery tasks: train, generate, evaluate, deliver_webhook.

Every task takes an id, re-reads its row and is safe to run twice (``acks_late`` redelivers).
torch, diffusers and the library are imported inside the tasks, so importing this module (which
``celery worker`` does at start) stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from dataclasses import fields
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from api.core.celery import TASK_EVALUATE, TASK_GENERATE, TASK_TRAIN, TASK_WEBHOOK
from api.core.db.models import Adapter, Checkpoint, Dataset, EvalScore, Job
from api.core.db.session import session_scope
from api.core.jobs import record_event
from api.core.settings import get_settings
from api.core.storage import JOBS, ArtifactStore, make_store
from worker.celery_app import celery_app
from worker.checkpoints import CheckpointScorer, attach_final_scores
from worker.failures import DB_UNREACHABLE, RETRY_ON_DB_OUTAGE, best_effort, disk_full_error
from worker.lease import JobLease
from worker.metrics import observe_training, training_done

log = logging.getLogger("worker.tasks")
_limits = get_settings()  # time limits are fixed when the task is registered; the rest is read per call


def _worker_id(task) -> str:
    return f"{task.request.hostname or socket.gethostname()}:{os.getpid()}"


def _message(exc: BaseException) -> str:
    """A job's error for its owner (read over HTTP): the library's errors already say what to do
    and name options as the API does (``api_message``: JSON field names, never a CLI flag);
    anything else gets its type name."""
    from styleinject.errors import FieldError, api_message

    text = api_message(exc).strip() or type(exc).__name__
    known = (FieldError, ValueError, FileNotFoundError)  # the library's errors are FieldErrors
    return text if isinstance(exc, known) else f"{type(exc).__name__}: {text}"


def _local(store: ArtifactStore, path: str | None) -> str | None:
    """A stored artifact path (possibly written on another machine) as a local folder or file here,
    fetched into the cache if the store is remote; paths outside the store (a hub id, a mounted
    model folder) are returned unchanged."""
    return store.localise(path) if path else path


# -- training ---------------------------------------------------------------------------------------

def _train_config(job: dict[str, Any], data_path: str, output_dir: Path):
    from styleinject import StyleInjectConfig
    from styleinject.train import TrainConfig

    params = dict(job["params"])
    known = {f.name for f in fields(TrainConfig)} - {"kind", "data", "output_dir", "resume", "adapter"}
    values = {k: v for k, v in params.items() if k in known}
    if job.get("skip_bad"):  # the dataset was uploaded with skip_bad: leave the same items out
        values["skip_bad"] = True
    adapter = StyleInjectConfig(**(params.get("adapter") or {}))
    # resume="latest" always: a fresh job has no checkpoint and starts at step 0; a redelivered
    # one continues from its newest checkpoint instead of training twice.
    return TrainConfig(kind=job["kind"], data=data_path, output_dir=str(output_dir), resume="latest",
                       adapter=adapter, **values)


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def _sync_checkpoints(session, job_id: str, output_dir: Path, adapter_id: str | None = None) -> None:
    """Make the job's checkpoint rows match the complete checkpoint folders on disk."""
    from styleinject.train.checkpoint import list_checkpoints
    from styleinject.train.validation import read_samples

    on_disk = {str(p): p for p in list_checkpoints(output_dir)}
    rows = {c.path: c for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id))}
    for path, row in rows.items():
        if path not in on_disk:
            session.delete(row)
        elif adapter_id is not None:
            row.adapter_id = adapter_id
    for path, p in on_disk.items():
        if path not in rows:
            step = _checkpoint_step(p)
            row = Checkpoint(job_id=job_id, adapter_id=adapter_id, step=step, path=path)
            if (samples := read_samples(p)) is not None:  # its validation grid (checkpoint_samples)
                row.samples = {k: samples[k] for k in ("prompts", "seeds", "steps", "guidance_scale", "resolution")}
            session.add(row)
            record_event(session, job_id, "checkpoint", {"step": step, "name": p.name})


def _claim(task, settings, job_id: str) -> JobLease | None:
    """The job's lease; None when the job already finished (a redelivery is a no-op). While another
    live worker holds the lease, the task is retried later."""
    lease = JobLease(settings, job_id, _worker_id(task))
    claim = lease.claim()
    if claim.status == "busy":
        raise task.retry(countdown=claim.retry_in_s, max_retries=None)
    return None if claim.status == "done" else lease


def _progress_dict(p) -> dict[str, Any]:
    if dataclasses.is_dataclass(p):
        return dataclasses.asdict(p)
    keys = ("step", "total", "loss", "lr", "samples_per_s", "eta_s", "terms")
    return {k: getattr(p, k) for k in keys if hasattr(p, k)}


# A database outage that outlasts the retries inside (worker/failures.py) retries the task: it
# re-claims the job (its own lease) and resumes from the newest checkpoint, so nothing stays running.
@celery_app.task(name=TASK_TRAIN, bind=True, soft_time_limit=_limits.job_soft_time_limit_s,
                 time_limit=_limits.job_time_limit_s, **RETRY_ON_DB_OUTAGE)
def train(self, job_id: str) -> dict[str, Any]:
    settings = get_settings()
    lease = _claim(self, settings, job_id)
    if lease is None:
        return {"job_id": job_id, "skipped": True}

    store = make_store(settings)
    with session_scope(settings.database_url) as session:
        job_row = session.get(Job, job_id)
        dataset = session.get(Dataset, job_row.dataset_id) if job_row.dataset_id else None
        job = {"kind": job_row.kind, "params": job_row.params, "tenant_id": job_row.tenant_id,
               "skip_bad": bool(dataset is not None and dataset.skip_bad)}
        data_path = dataset.path if dataset is not None and dataset.status == "ready" else None
    output_dir = store.path_for(JOBS, job_id)
    if store.exists(JOBS, job_id):  # a redelivered job resumes from the checkpoints stored so far
        store.get_dir(JOBS, job_id)

    scorer = CheckpointScorer(settings, job["params"].get("base_model") or settings.resolved_base_model())

    def record_checkpoints() -> None:
        store.put_dir(JOBS, job_id, output_dir)  # checkpoints outlive this machine (no-op locally)
        with session_scope(settings.database_url) as session:
            _sync_checkpoints(session, job_id, output_dir)
        with session_scope(settings.database_url) as session:  # rows first: the page shows them while scoring
            scorer.score_new(session, job_id)

    seen: set[Path] = set()
    last_step = [0]

    def on_progress(p) -> None:
        from styleinject.train.checkpoint import list_checkpoints

        # every field of the loop's Progress (step, total, loss, lr, samples_per_s, eta_s, and the
        # per-term losses when the loop reports them); non-finite numbers are stored as null
        point = _progress_dict(p)
        lease.report(point)
        observe_training(job["kind"], point, last_step)
        current = set(list_checkpoints(output_dir))  # rows follow the folders while training
        if current != seen:
            try:
                record_checkpoints()
            except DB_UNREACHABLE:  # training goes on; the rows follow at the next progress point
                log.warning("job %s: checkpoint rows not recorded (database unreachable); retrying", job_id)
                return
            seen.clear()
            seen.update(current)

    with lease.heartbeat():
        try:
            if data_path is None:
                raise FileNotFoundError("the job's dataset was deleted or is not ready")
            data_path = _local(store, data_path)
            from styleinject.train import run_training

            cfg = _train_config(job, data_path, output_dir)
            try:
                if settings.train_processes > 1:  # one process per GPU, the same loop (rank 0 reports)
                    from worker.distributed import run_launched

                    result = run_launched(cfg, settings.train_processes, on_progress, lease.should_cancel)
                else:
                    result = run_training(cfg, progress=on_progress, should_cancel=lease.should_cancel)
            finally:
                training_done(job["kind"])
        except SoftTimeLimitExceeded:
            record_checkpoints()
            lease.finish("failed", f"time limit of {settings.job_soft_time_limit_s} s reached "
                                   "(STYLEINJECT_JOB_SOFT_TIME_LIMIT_S); checkpoints kept")
            return {"job_id": job_id, "status": "failed"}
        except Exception as exc:  # noqa: BLE001 - the job row carries the message
            log.exception("job %s failed", job_id)
            error = disk_full_error(exc, output_dir) or _message(exc)  # full disk: partial checkpoint removed
            if output_dir.is_dir():  # a full disk or a database hiccup here must not leave the job running
                best_effort(record_checkpoints, f"job {job_id}: recording its checkpoints")
            lease.finish("failed", error)
            return {"job_id": job_id, "status": "failed"}

    if lease.lost:  # another worker took over; it owns the row now
        return {"job_id": job_id, "status": "lost"}
    summary = {"steps_done": result.steps_done, "loss": result.loss}
    if result.cancelled:
        record_checkpoints()
        lease.finish("cancelled", result=summary)
        return {"job_id": job_id, "status": "cancelled"}

    from styleinject.adapters.io import read_adapter_metadata

    store.put_dir(JOBS, job_id, output_dir)  # publish the adapter and its checkpoints
    with session_scope(settings.database_url) as session:
        adapter = session.scalar(select(Adapter).where(Adapter.job_id == job_id))
        if adapter is None:
            adapter = Adapter(job_id=job_id, tenant_id=job["tenant_id"])
            session.add(adapter)
        adapter.name = job["params"].get("name") or f"{job['kind']}-{job_id[:8]}"
        adapter.kind = job["kind"]
        adapter.base_model = cfg.base_model
        adapter.path = str(output_dir)
        adapter.config = json.loads((output_dir / "adapter_config.json").read_text())
        from worker.generation import content_hash

        # the engine's caches key adapters by id and content, never by path or file time
        adapter.meta = read_adapter_metadata(output_dir) | {"sha256": content_hash(output_dir)}
        adapter.size_bytes = store.size(JOBS, job_id)
        session.flush()
        _sync_checkpoints(session, job_id, output_dir, adapter.id)
        scorer.score_new(session, job_id)
        attach_final_scores(session, job_id, adapter.id, result.steps_done)
        adapter_id = adapter.id
    lease.finish("succeeded", result=summary | {"adapter_id": adapter_id})
    return {"job_id": job_id, "status": "succeeded", "adapter_id": adapter_id}


# -- generation -------------------------------------------------------------------------------------

def get_pipeline(base_model: str):
    """The resident pipeline (one base model per process), shared with the serving engine."""
    from worker.generation import ENGINES

    return ENGINES.get(base_model, get_settings()).pipe


@celery_app.task(name=TASK_GENERATE, bind=True)
def generate(self, request_id: str) -> dict[str, Any]:
    """Run one request on this process's serving engine (worker/generation.py). Many of these run at
    once in a threads-pool worker and share UNet forwards; the time limit is the engine wait's own."""
    from worker.generation import run_generation

    return run_generation(get_settings(), request_id, _worker_id(self), _local)


# -- evaluation -------------------------------------------------------------------------------------

_EVAL_OPTIONS = ("seeds", "steps", "guidance_scale", "width", "height", "negative_prompt", "adapter_scale")


@celery_app.task(name=TASK_EVALUATE, bind=True, soft_time_limit=_limits.job_soft_time_limit_s,
                 time_limit=_limits.job_time_limit_s, **RETRY_ON_DB_OUTAGE)
def evaluate(self, job_id: str) -> dict[str, Any]:
    settings = get_settings()
    lease = _claim(self, settings, job_id)
    if lease is None:
        return {"job_id": job_id, "skipped": True}
    store = make_store(settings)
    with session_scope(settings.database_url) as session:
        params = dict(session.get(Job, job_id).params)
        adapter = session.get(Adapter, params["adapter_id"])
        target = (adapter.path, adapter.base_model) if adapter is not None else None

    def on_progress(done: int, total: int) -> None:
        lease.report({"step": done, "total": total})

    with lease.heartbeat():
        try:
            if target is None:
                raise FileNotFoundError("the adapter was deleted")
            target = (_local(store, target[0]), target[1])
            from styleinject.eval import evaluate_adapter

            report = evaluate_adapter(
                target[1], target[0], prompts=params.get("prompts"),
                scorers=params.get("scorers") or ("clipscore",), scorer_paths=settings.scorer_paths,
                output_dir=store.path_for(JOBS, job_id), pipeline=get_pipeline(target[1]),
                progress=on_progress, **{k: params[k] for k in _EVAL_OPTIONS if k in params})
        except SoftTimeLimitExceeded:
            lease.finish("failed", "time limit reached (STYLEINJECT_JOB_SOFT_TIME_LIMIT_S)")
            return {"job_id": job_id, "status": "failed"}
        except Exception as exc:  # noqa: BLE001
            log.exception("evaluation %s failed", job_id)
            lease.finish("failed", _message(exc))
            return {"job_id": job_id, "status": "failed"}
    if lease.lost:
        return {"job_id": job_id, "status": "lost"}
    if store.path_for(JOBS, job_id).is_dir():  # the evaluation's images outlive this machine
        store.put_dir(JOBS, job_id, store.path_for(JOBS, job_id))
    overall = report["summary"]["overall"]
    with session_scope(settings.database_url) as session:
        if session.get(Adapter, params["adapter_id"]) is not None:
            for metric, stats in overall.items():
                session.add(EvalScore(adapter_id=params["adapter_id"], job_id=job_id, metric=metric,
                                      value=float(stats["mean"]), details=stats))
                record_event(session, job_id, "score", {"metric": metric, "value": float(stats["mean"])})
    lease.finish("succeeded", result={"summary": report["summary"], "settings": report["settings"]})
    return {"job_id": job_id, "status": "succeeded"}


# -- webhooks -------------------------------------------------------------------------------------

@celery_app.task(name=TASK_WEBHOOK, bind=True, ignore_result=True, soft_time_limit=_limits.webhook_timeout_s + 30,
                 time_limit=_limits.webhook_timeout_s + 60)
def deliver_webhook(self, delivery_id: str) -> None:
    """One attempt to POST a job event (api/core/webhooks.py); the next one is this task again, sent
    with the backoff as countdown. The delivery row counts the attempts and bounds them."""
    from celery.exceptions import Reject

    from api.core.webhooks import abandon, attempt

    wait_s = attempt(get_settings(), delivery_id)
    if wait_s is None:
        return
    try:
        raise self.retry(countdown=wait_s, max_retries=None)
    except Reject as exc:  # the retry could not be queued (broker down): the row must not stay pending
        abandon(get_settings(), delivery_id, f"could not queue the next attempt: {exc.reason}")
        raise
