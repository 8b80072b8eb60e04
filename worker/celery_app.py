"""The worker's Celery app (``celery -A worker.celery_app:celery_app worker``): the core's
configuration plus this package's tasks, built from the process settings (``get_settings()``:
the environment, or what ``styleinject worker --home`` configured before importing this)."""

from __future__ import annotations

from api.core import webhooks
from api.core.celery import make_celery
from api.core.settings import get_settings
# connect the signals: logging (no progress bars, request ids), metrics, solo-pool time limits
from worker import logs, metrics, time_limits  # noqa: F401

celery_app = make_celery(get_settings(), include=["worker.tasks"])
webhooks.install(get_settings(), celery_app)  # job events this worker commits are sent as webhooks
