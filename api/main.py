"""The FastAPI app. ``uvicorn --factory api.main:create_app`` (or ``api.main:app``).

No torch here: training, inference and evaluation run in the Celery worker; tasks are sent by
name. Uploads are validated in-process with the library's torch-free ``styleinject.train.data``. Migrations are a start-up step (``styleinject db upgrade``), never run on import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import __version__, metrics
from api.routes import (adapters, checkpoints, dashboard, datasets, evaluate, generate, generations, health, jobs,
                        login, models, train, webhooks)
from api.core import webhooks as job_webhooks
from api.core.celery import make_celery
from api.core.logs import RequestIdMiddleware, connect_celery_publisher, install_api_logging
from api.core.settings import Settings, get_settings
from api.core.storage import make_store
from api.core.sweep import sweep_orphans
from api.guards import BodyGuard, SafeJSONResponse, finite, is_json_content_type
from api.redact import install_log_redaction

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"  # dashboard CSS/JS, vendored Swagger UI

DESCRIPTION = """Train and serve StyleInject adapters for Stable Diffusion UNets.

Authenticate with `Authorization: Bearer <API key>` (create keys with
`styleinject apikey create --tenant NAME`). Every dataset, job and adapter belongs to a tenant;
another tenant's id answers 404. Errors are JSON: `{"message": "...", "detail": ...}`.
"""


def _sweep(settings: Settings) -> None:
    try:
        sweep_orphans(settings, older_than_s=3600)  # an hour: another replica may be validating an upload
    except Exception:  # noqa: BLE001 - no tables yet, a database hiccup: the API starts anyway
        log.exception("removing orphaned artifacts failed")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """With STYLEINJECT_METRICS_PORT, also serve /metrics on that port (docs/ops.md). At start,
    remove artifacts a killed API process left without their rows (api/core/sweep.py)."""
    settings = app.state.settings
    await asyncio.to_thread(_sweep, settings)
    server = metrics.serve_port(settings.metrics_port, metrics.metrics_registry(settings)) \
        if settings.metrics_port else None
    try:
        yield
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        lifespan=lifespan,
        title="StyleInject",
        version=__version__,
        description=DESCRIPTION,
        default_response_class=SafeJSONResponse,  # a NaN (diverged loss) is null, not a 500
        docs_url=None,  # served below from the vendored Swagger UI: /docs works offline
        redoc_url=None,  # ReDoc would load from a CDN
        openapi_tags=[
            {"name": "datasets", "description": "Upload and inspect training data"},
            {"name": "jobs", "description": "Training and evaluation jobs"},
            {"name": "adapters", "description": "Trained adapters"},
            {"name": "generate", "description": "Text-to-image with an optional adapter"},
            {"name": "models", "description": "Registered base and teacher models"},
            {"name": "webhooks", "description": "Signed job event notifications: secret, deliveries"},
            {"name": "dashboard", "description": "HTML overview"},
            {"name": "health", "description": "Liveness"},
        ],
    )
    app.state.settings = settings
    app.state.celery = make_celery(settings)
    job_webhooks.install(settings, app.state.celery)  # job events committed here (creation, cancel)
    app.state.store = make_store(settings)
    app.add_middleware(BodyGuard, max_bytes=settings.max_json_bytes, max_depth=settings.max_json_depth)
    app.add_middleware(metrics.RequestMetrics)  # BodyGuard's 413/415 answers are counted
    app.add_middleware(RequestIdMiddleware)  # outermost: every response has X-Request-ID, every log line its id
    install_api_logging(settings.log_format)  # STYLEINJECT_LOG_FORMAT for uvicorn's logs and ours
    connect_celery_publisher()  # each task queued while a request runs carries its id to the worker
    install_log_redaction()  # no key material in the access log (?key=...), ours or uvicorn's
    for module in (datasets, train, jobs, checkpoints, adapters, generate, generations, evaluate, models, webhooks,
                   dashboard, login, health, metrics):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse({"message": message, "detail": exc.detail},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[Any] = finite(jsonable_encoder(exc.errors()))  # echoed input: no NaN, cut short
        content_type = request.headers.get("content-type")
        if not is_json_content_type(content_type) and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
            return JSONResponse({"message": f"unsupported content type {content_type[:100]!r}: send the body "
                                 "as JSON with `Content-Type: application/json`", "detail": None}, status_code=415)
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors]
        return JSONResponse({"message": "invalid request: " + "; ".join(parts), "detail": errors},
                            status_code=422)

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> JSONResponse:
        # the database refused a value taken from the request (an integer past 64 bits...)
        message = "invalid request: a value is out of range for the database; use smaller numbers"
        return JSONResponse({"message": message, "detail": [{"loc": ["request"], "msg": message,
                                                             "type": "value_error"}]}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"message": f"internal error ({type(exc).__name__}); see the API log",
                             "detail": None}, status_code=500)

    return app


def __getattr__(name: str) -> Any:
    # `uvicorn api.main:app` works too; the app is built on first access, not at import.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
