"""The Celery app: configuration and routes. Imports no torch, so the API can send tasks by name.

Queues: ``train`` (training and evaluation: long GPU jobs) and ``generate`` (inference, short).
A worker listens on both by default; dedicated inference workers use ``-Q generate``.
"""

from __future__ import annotations

from celery import Celery

from api.settings import Settings, get_settings
from worker import time_limits  # noqa: F401 - connects the solo-pool soft time limits

TRAIN_QUEUE = "train"
GENERATE_QUEUE = "generate"
QUEUES = (TRAIN_QUEUE, GENERATE_QUEUE)

TASK_ROUTES = {
    "worker.tasks.train": {"queue": TRAIN_QUEUE},
    "worker.tasks.evaluate": {"queue": TRAIN_QUEUE},
    "worker.tasks.generate": {"queue": GENERATE_QUEUE},
}


def make_celery(settings: Settings) -> Celery:
    app = Celery("styleinject", include=["worker.tasks"])
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


celery_app = make_celery(get_settings())
