"""The Celery app factory, task names and queues. Imports no torch and no ``worker`` code, so the API
sends tasks by name and the worker registers them under the same names.

Queues: ``train`` (training and evaluation: long GPU jobs) and ``generate`` (inference, short).
A worker listens on both by default; dedicated inference workers use ``-Q generate``. Webhook
deliveries (short HTTP POSTs) go to ``generate`` too: a train worker runs one job at a time, so
a delivery queued there would wait for the job it reports on.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from api.core.settings import Settings

TRAIN_QUEUE = "train"
GENERATE_QUEUE = "generate"
QUEUES = (TRAIN_QUEUE, GENERATE_QUEUE)

# Task names: the API sends these, worker/tasks.py registers them (``@celery_app.task(name=...)``).
TASK_TRAIN = "worker.tasks.train"
TASK_EVALUATE = "worker.tasks.evaluate"
TASK_GENERATE = "worker.tasks.generate"
TASK_WEBHOOK = "worker.tasks.deliver_webhook"
TASK_NAMES = (TASK_TRAIN, TASK_EVALUATE, TASK_GENERATE, TASK_WEBHOOK)

TASK_ROUTES = {
    TASK_TRAIN: {"queue": TRAIN_QUEUE},
    TASK_EVALUATE: {"queue": TRAIN_QUEUE},
    TASK_GENERATE: {"queue": GENERATE_QUEUE},
    TASK_WEBHOOK: {"queue": GENERATE_QUEUE},
}


def task_for_job(kind: str) -> str:
    """The task that runs a job of this kind (``evaluate`` or a training kind)."""
    return TASK_EVALUATE if kind == "evaluate" else TASK_TRAIN


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """A Celery app configured from ``settings``. The API uses it as a client (send_task by name);
    the worker passes ``include=["worker.tasks"]`` so its process registers the tasks."""
    app = Celery("styleinject", include=list(include))
    transport_options: dict[str, object] = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        transport_options["visibility_timeout"] = settings.visibility_timeout_s
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    elif settings.broker_url.startswith("sqla+sqlite"):
        # The SQLAlchemy transport passes its options to create_engine(); the API and the worker
        # share the SQLite file, so wait for its lock instead of failing. (It never re-delivers an
        # unacknowledged message; `styleinject serve` re-queues orphaned jobs at start instead.)
        transport_options["connect_args"] = {"timeout": 30}
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_routes=TASK_ROUTES,
        task_default_queue=TRAIN_QUEUE,
        # One long GPU task at a time per worker process; the message is acknowledged only when
        # the task ends, and re-queued if the worker dies (the job lease makes the rerun resume).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
        task_track_started=True,
        result_expires=3600,
        result_extended=False,
        worker_send_task_events=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app
