"""``GET /metrics`` (Prometheus text format), the request-metrics middleware and the metrics port.

``/metrics`` answers an admin key (tenant ``admin``) or the scrape token ``STYLEINJECT_METRICS_TOKEN``
(``Authorization: Bearer <token>``). With ``STYLEINJECT_METRICS_PORT`` set the same page is also
served, without auth, on that port (bind it to a private network). Metric names: docs/ops.md.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import BOOTSTRAP_TENANT, authenticate
from api.core.db.session import session_factory
from api.core.metrics import (  # noqa: F401 - serve_port: used by api.main
    CONTENT_TYPE, HTTP_LATENCY, HTTP_REQUESTS, DatabaseCollector, render, scrape_registry, serve_port,
)
from api.core.settings import Settings
from api.deps import SettingsDep, bearer

router = APIRouter(tags=["health"])
UNMATCHED = "<unmatched>"  # 404s for paths no route knows: one label value, not one per path


def _authorised(settings: Settings, key: str) -> bool:
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if token and hmac.compare_digest(key.encode(), token.encode()):
        return True
    bootstrap = settings.bootstrap_key.get_secret_value() if settings.bootstrap_key else None
    session = session_factory(settings.database_url)()
    try:
        tenant = authenticate(session, key, bootstrap)
        return tenant is not None and tenant.name == BOOTSTRAP_TENANT
    finally:
        session.close()


@router.get("/metrics", include_in_schema=False)
def read_metrics(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Response:
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing credentials: send `Authorization: Bearer "
                            "<admin key or STYLEINJECT_METRICS_TOKEN>`", headers={"WWW-Authenticate": "Bearer"})
    if not _authorised(settings, credentials.credentials):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "metrics need an admin key (tenant admin) or "
                            "the scrape token STYLEINJECT_METRICS_TOKEN")
    return Response(render([DatabaseCollector(settings.database_url)]), media_type=CONTENT_TYPE)


def metrics_registry(settings: Settings):
    """What the metrics port serves: the API's metrics plus the database gauges."""
    return scrape_registry([DatabaseCollector(settings.database_url)])


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope) -> str:
    """``/jobs/{job_id}``, not ``/jobs/3f2a...``; a mount (``/static``) by its prefix."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class RequestMetrics:
    """Count every HTTP request by method, route template and status; time it until the response is
    sent (a server-sent-events stream counts until it ends). Outermost, so 413/415 answers count."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_template(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            HTTP_REQUESTS.labels(method, route, str(code)).inc()
            HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - started)
