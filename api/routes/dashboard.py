"""GET /dashboard: server-rendered jobs and adapters of the calling tenant.

Auth for browsers: open ``/dashboard?key=<API key>`` once; the key moves into an HttpOnly,
SameSite=Strict cookie and the browser is redirected to ``/dashboard`` (so the key leaves the URL).
The cookie also authenticates ``GET /jobs/{id}/events`` from the page. ``?logout=1`` clears it.
A bearer header works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from api.auth import authenticate
from api.core.db.models import Adapter, Job
from api.deps import KEY_COOKIE, SessionDep, SettingsDep
from api.routes.common import job_out

router = APIRouter(prefix="/dashboard", tags=["dashboard"])
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent.parent / "templates"))


@router.get("", response_class=HTMLResponse, summary="HTML dashboard (key via ?key= once, then cookie)",
            responses={303: {"description": "Key stored in a cookie; redirect to /dashboard"},
                       401: {"content": {"text/html": {}}, "description": "Key form"}})
def read_dashboard(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: Annotated[str | None, Query(description="API key, moved into a cookie")] = None,
    logout: bool = False,
) -> Response:
    if logout:
        response = RedirectResponse("/dashboard", status_code=303)
        response.delete_cookie(KEY_COOKIE)
        return response
    bootstrap = settings.bootstrap_key.get_secret_value() if settings.bootstrap_key else None
    if key is not None:
        if authenticate(session, key, bootstrap) is None:
            return _login(request, "That key is invalid or revoked.")
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=30 * 24 * 3600)
        return response
    header = request.headers.get("authorization", "")
    key = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(KEY_COOKIE)
    tenant = authenticate(session, key, bootstrap) if key else None
    if tenant is None:
        return _login(request, "Enter an API key." if not key else "That key is invalid or revoked.")
    jobs = [job_out(j) for j in session.scalars(
        select(Job).where(Job.tenant_id == tenant.id).order_by(Job.created_at.desc()).limit(50))]
    adapters = list(session.scalars(
        select(Adapter).where(Adapter.tenant_id == tenant.id).order_by(Adapter.created_at.desc()).limit(50)))
    return templates.TemplateResponse(
        request,
        "dashboard.html",
        {"tenant": tenant, "jobs": jobs, "adapters": adapters,
         "active": any(j.status in ("queued", "running") for j in jobs)},
    )


def _login(request: Request, message: str) -> Response:
    return templates.TemplateResponse(request, "login.html", {"message": message}, status_code=401)
