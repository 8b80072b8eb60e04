"""Registered models: every tenant lists their names; only the admin adds or removes them.

Admin = the tenant ``admin`` (the bootstrap key's and the first-start key's tenant). Tenants name a
registered model in ``POST /train``; nothing else reaches the workers' model loader.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status

from api.auth import BOOTSTRAP_TENANT
from api.core.db.models import Tenant
from api.core.registry import RegistryError, add_model, list_models, remove_model, resolve_model
from api.deps import SessionDep, TenantDep
from api.routes.common import AUTH_ERRORS, errors
from api.schemas import ModelIn, ModelOut

router = APIRouter(prefix="/models", tags=["models"], responses=AUTH_ERRORS)


def _require_admin(tenant: Tenant) -> None:
    if tenant.name != BOOTSTRAP_TENANT:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only the admin registers models "
                            "(`styleinject model add NAME SOURCE`, or POST /models with an admin key)")


@router.get("", response_model=list[ModelOut], summary="Registered base and teacher models")
def list_registered_models(session: SessionDep, tenant: TenantDep) -> list[ModelOut]:
    admin = tenant.name == BOOTSTRAP_TENANT
    return [ModelOut(name=m.name, source=m.source if admin else None, created_at=m.created_at)
            for m in list_models(session)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ModelOut,
             responses=errors(403, 409, 422), summary="Register a model (admin only)")
def create_registered_model(body: ModelIn, session: SessionDep, tenant: TenantDep) -> ModelOut:
    _require_admin(tenant)
    if resolve_model(session, body.name) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"model {body.name!r} is already registered; "
                            "DELETE /models/{name} first")
    try:
        row = add_model(session, body.name, body.source)
    except RegistryError as exc:
        raise HTTPException(422, str(exc)) from None
    session.commit()
    return ModelOut(name=row.name, source=row.source, created_at=row.created_at)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=errors(403, 404), summary="Remove a registered model (admin only)")
def delete_registered_model(name: str, session: SessionDep, tenant: TenantDep) -> Response:
    _require_admin(tenant)
    if not remove_model(session, name):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {name[:100]!r} not found")
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
