"""Dashboard login: a form POST that moves the API key into a cookie, so a key is never in a URL
(address bar, history, proxy and access logs).

``GET /dashboard/login`` shows the form; ``POST /dashboard/login`` (form field ``key``) checks the
key and sets it as an HttpOnly, SameSite=Strict cookie, ``Secure`` when the request came over HTTPS
(behind a TLS-terminating proxy run uvicorn with ``--proxy-headers --forwarded-allow-ips=<proxy>``
so the scheme is seen), then redirects to ``/dashboard``. An old ``/dashboard?key=...`` link is
redirected here without using the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api.auth import authenticate
from api.deps import KEY_COOKIE, SessionDep, SettingsDep

router = APIRouter(prefix="/dashboard", tags=["dashboard"])
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent.parent / "templates"))
COOKIE_MAX_AGE_S = 30 * 24 * 3600


def login_page(request: Request, message: str, status_code: int = 200) -> Response:
    return templates.TemplateResponse(request, "login.html", {"message": message}, status_code=status_code)


@router.get("/login", response_class=HTMLResponse, summary="Dashboard login form")
def read_login(request: Request) -> Response:
    return login_page(request, "Enter an API key.")


@router.post("/login", response_class=HTMLResponse, summary="Log in: the key (form field) moves into a cookie",
             responses={303: {"description": "Key stored in a cookie; redirect to /dashboard"},
                        401: {"content": {"text/html": {}}, "description": "Invalid key: the form again"}})
def create_login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: Annotated[str, Form(min_length=1, max_length=512, description="An API key")],
) -> Response:
    bootstrap = settings.bootstrap_key.get_secret_value() if settings.bootstrap_key else None
    if authenticate(session, key, bootstrap) is None:
        return login_page(request, "That key is invalid or revoked.", status_code=401)
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=COOKIE_MAX_AGE_S)
    return response
