"""FastAPI dependencies: settings, DB session, Celery client, artifact store, the calling tenant, owned rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, TypeVar

from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import authenticate
from api.core.db.models import Tenant
from api.core.db.session import session_factory
from api.core.settings import Settings
from api.core.storage import ArtifactStore

KEY_COOKIE = "styleinject_key"

T = TypeVar("T")


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


CeleryDep = Annotated[Celery, Depends(get_celery)]

def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer si_...`")


def get_tenant(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    """The tenant of the bearer key (or of the dashboard cookie, for browsers)."""
    key = credentials.credentials if credentials else request.cookies.get(KEY_COOKIE)
    if not key:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send `Authorization: Bearer <key>` (create one with "
            "`styleinject apikey create --tenant NAME`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    bootstrap = settings.bootstrap_key.get_secret_value() if settings.bootstrap_key else None
    tenant = authenticate(session, key, bootstrap)
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


@dataclass(frozen=True)
class TenantRef:
    id: str
    name: str


def get_tenant_ref(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> TenantRef:
    """The calling tenant, authenticated with a session closed before the route runs: for routes
    that wait (SSE, the synchronous /generate), which must not hold a database connection."""
    session = session_factory(settings.database_url)()
    try:
        tenant = get_tenant(request, session, settings, credentials)
        return TenantRef(tenant.id, tenant.name)
    finally:
        session.close()


TenantRefDep = Annotated[TenantRef, Depends(get_tenant_ref)]


def get_owned(session: Session, model: type[T], id_: str, tenant: Tenant) -> T:
    """The row if it exists and belongs to the tenant; 404 otherwise (never 403: ids don't leak)."""
    row = session.get(model, id_)
    if row is None or row.tenant_id != tenant.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{model.__tablename__[:-1]} {id_} not found")
    return row
