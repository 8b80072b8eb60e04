"""The worker's logging (api/core/logs.py has the formats): Celery's and the tasks' lines in
STYLEINJECT_LOG_FORMAT, each task's lines with the request id its message carried, and no progress
bars (tqdm writes them to stderr, which Celery turns into WARNING lines: dozens per model load).

Imported by worker/celery_app.py, so ``styleinject worker`` and ``celery -A worker.celery_app``
(``styleinject serve``'s children) both get it when the worker starts (``celeryd_init``, in the main
process before any pool child or task module loads tqdm).
"""

from __future__ import annotations

import os
from typing import Any

from celery.signals import celeryd_init, setup_logging, task_postrun, task_prerun

from api.core.logs import configure_logging, connect_celery_publisher, request_id_var, task_request_id
from api.core.settings import get_settings

_tokens: dict[str, Any] = {}  # task id -> the contextvar token to reset at postrun


def quiet_progress_bars() -> None:
    """No progress bars in this process or its children (accelerate launch): tqdm reads TQDM_* when
    it is first imported, huggingface_hub its variable."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def tame_libraries() -> None:
    """diffusers and transformers draw bars through their own wrappers (the "Loading pipeline
    components" bar is diffusers') and log through their own stderr handlers, in their own format;
    switch the bars off and send their records to ours. Called before each task (the libraries are
    imported by the first task that needs them, so this imports them first: once per process)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.disable_default_handler()
        library.enable_propagation()


connect_celery_publisher()  # a task's retry (and any task it sends) keeps its request id


@celeryd_init.connect(weak=False)
def _early_logging(options: dict | None = None, **_: Any) -> None:
    """Before the worker's first own line (its privilege warning comes before ``setup_logging``).
    Only a worker process goes quiet: importing this module (tests, tools) leaves the environment be."""
    quiet_progress_bars()
    configure_logging(get_settings().log_format, (options or {}).get("loglevel") or "INFO")


@setup_logging.connect(weak=False)
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    """Connected, so Celery leaves the logging setup to us (main process and prefork children)."""
    configure_logging(get_settings().log_format, loglevel or "INFO")


@task_prerun.connect(weak=False)
def _enter_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    tame_libraries()
    if task_id is not None:
        _tokens[task_id] = request_id_var.set(task_request_id(task))


@task_postrun.connect(weak=False)
def _leave_task(task_id: str | None = None, **_: Any) -> None:
    token = _tokens.pop(task_id, None) if task_id is not None else None
    if token is not None:
        try:
            request_id_var.reset(token)
        except ValueError:  # set in another context (a pool that ran prerun elsewhere): just clear it
            request_id_var.set(None)
