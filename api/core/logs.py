"""Logs operators can keep: one format for every process, a request id on every line, no payloads.

- ``STYLEINJECT_LOG_FORMAT=text`` (default) or ``json``: one JSON object per line with ``time``,
  ``level``, ``logger``, ``message``, ``request_id`` (and ``exc_info`` for a traceback), for log
  shippers. Used by the API (uvicorn's access and error logs and ours), the worker (Celery's logs,
  the tasks' logs) and both children of ``styleinject serve``.
- **Request id**: the API takes the caller's ``X-Request-ID`` (if it is a short token) or makes one,
  returns it in the response header, logs it on every line of the request, and sends it with each
  Celery task it queues (a message header); the worker logs it on every line of that task.
- **No payloads**: Celery logs a task's return value at INFO; ``PayloadFilter`` drops it (and the
  copy in the record's ``data``). Progress bars are the worker's business (worker/celery_app.py).

Torch-free: the API imports this.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")
REQUEST_ID_HEADER = "X-Request-ID"
# What a caller's X-Request-ID may be (a proxy's or a client's trace id); anything else is replaced,
# so a header cannot forge log lines or carry a payload into them.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("styleinject_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """The caller's id if it is a plain token of at most 128 characters, else a new one."""
    return value if value and _REQUEST_ID.match(value) else new_request_id()


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


class RequestIdFilter(logging.Filter):
    """Puts the current request id (or ``-``) on every record as ``record.request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get() or "-"
        return True


class PayloadFilter(logging.Filter):
    """Celery's success line without the task's return value: ``Task x[id] succeeded in 1.2s``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, dict) and "return_value" in args:
            if isinstance(record.msg, str) and "%(return_value)" in record.msg:
                record.msg = re.sub(r":?\s*%\(return_value\)[-#0 +]*\d*(?:\.\d+)?[a-z]", "", record.msg)
            record.args = {k: v for k, v in args.items() if k != "return_value"}
            if isinstance(getattr(record, "data", None), dict):
                record.data = record.args
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extras (Celery's ``data``...) are left out on purpose."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get() or "-",
            "process": record.process,
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)} (STYLEINJECT_LOG_FORMAT)")
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def _dress(handler: logging.Handler, log_format: str) -> None:
    handler.setFormatter(make_formatter(log_format))
    for kind in (RequestIdFilter, PayloadFilter):
        if not any(isinstance(f, kind) for f in handler.filters):
            handler.addFilter(kind())


class _OurHandler(logging.StreamHandler):
    """The handler ``configure_logging`` adds (so a second call replaces it rather than doubling lines)."""


def configure_logging(log_format: str, level: str | int = "INFO") -> None:
    """A process whose logging we own (the worker): one handler on the root logger, writing to the
    real stderr (Celery redirects ``sys.stderr`` into the logs), in ``log_format``."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(handler)
    handler = _OurHandler(sys.__stderr__)
    _dress(handler, log_format)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    logging.captureWarnings(True)  # Python warnings become records too (else raw lines on stderr)


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def install_api_logging(log_format: str) -> None:
    """The API's logs in ``log_format`` with request ids: uvicorn already configured its loggers
    (``uvicorn --factory`` sets them up before it builds the app), so their handlers get our
    formatter and filters; our own loggers go through a root handler when nothing else (a test's
    log capture) has one."""
    for name in UVICORN_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            _dress(handler, log_format)
    root = logging.getLogger()
    if not root.handlers:
        configure_logging(log_format, "INFO")
    else:
        for handler in root.handlers:
            if isinstance(handler, _OurHandler):
                _dress(handler, log_format)


def uvicorn_log_config(log_format: str, level: str = "info") -> dict[str, Any]:
    """``uvicorn.run(log_config=...)`` for ``styleinject serve``: uvicorn's loggers and the root in
    ``log_format``, each line with its request id."""
    formatter = ({"()": f"{__name__}.JsonFormatter"} if log_format == "json"
                 else {"format": TEXT_FORMAT})
    handler = {"class": f"{__name__}._OurHandler", "formatter": "styleinject",
               "filters": ["request_id", "payload"], "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"styleinject": formatter},
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}, "payload": {"()": f"{__name__}.PayloadFilter"}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": ["default"], "level": level.upper(), "propagate": False},
        },
        "root": {"handlers": ["default"], "level": level.upper()},
    }


class RequestIdMiddleware:
    """ASGI: the request's id (the caller's ``X-Request-ID`` or a new one) is current while the
    request runs (so uvicorn's access line and ours carry it) and is returned in ``X-Request-ID``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or ()).get(REQUEST_ID_HEADER.lower().encode())
        request_id = accept_request_id(sent.decode("latin-1") if sent else None)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        with request_context(request_id):
            await self.app(scope, receive, send_with_id)


# -- Celery: the request id travels in a message header -----------------------------------------

HEADER = "styleinject_request_id"


def _add_request_id(headers: dict | None = None, **_: Any) -> None:
    request_id = request_id_var.get()
    if request_id and headers is not None and HEADER not in headers:
        headers[HEADER] = request_id


def task_request_id(task: Any) -> str | None:
    """The request id a task's message carried (custom headers become attributes of the request)."""
    request = getattr(task, "request", None)
    value = getattr(request, HEADER, None) or (getattr(request, "headers", None) or {}).get(HEADER)
    return value if isinstance(value, str) and _REQUEST_ID.match(value) else None


def connect_celery_publisher() -> None:
    """Every task this process sends carries the current request id (idempotent)."""
    from celery.signals import before_task_publish

    before_task_publish.connect(_add_request_id, weak=False, dispatch_uid="styleinject-request-id")
