from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import SessionDep
from api.schemas import HealthOut

router = APIRouter(prefix="/healthz", tags=["health"])


@router.get("", response_model=HealthOut, summary="Liveness and database check (no auth)")
def read_health(session: SessionDep) -> HealthOut:
    from api import __version__

    try:
        session.execute(text("SELECT 1"))
        database = True
    except Exception:  # noqa: BLE001 - reported, not raised
        database = False
    return HealthOut(status="ok" if database else "degraded", database=database, version=__version__)
